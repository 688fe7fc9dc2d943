"""tests/mutations/plant.py: the results page lists only the commands that still made a row."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "plant", Path(__file__).parent / "mutations" / "plant.py"
)
plant = importlib.util.module_from_spec(spec)
sys.modules["plant"] = plant  # its dataclasses look their module up
spec.loader.exec_module(plant)


def test_a_command_whose_mutations_all_ran_again_later_is_dropped():
    a, b, c = (m.name for m in plant.MUTATIONS[:3])
    every = "    python tests/mutations/plant.py --table t.md"
    first = f"    python tests/mutations/plant.py {a} {b} --table t.md"
    second = f"    python tests/mutations/plant.py {b} --table t.md"
    third = f"    python tests/mutations/plant.py {a} {c} --table t.md"
    assert plant.commands_still_behind_rows([first, second]) == [first, second]
    assert plant.commands_still_behind_rows([first, second, third]) == [second, third]
    assert plant.commands_still_behind_rows([every, third]) == [every, third]
    assert plant.commands_still_behind_rows([third, every]) == [every]
    assert plant.commands_still_behind_rows([second, second]) == [second]
