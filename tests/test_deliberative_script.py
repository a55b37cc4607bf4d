"""scripts/deliberative.py on a miniature CUB tree with random weights: every setting of both comparisons runs,
the table and the comparison plots are written."""

import importlib.util
from pathlib import Path

from _trees import make_cub_tree

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "deliberative.py"


def load_script():
    spec = importlib.util.spec_from_file_location("deliberative_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_the_table(tmp_path, capsys):
    cub = make_cub_tree(tmp_path / "data", n_classes=5, per_class=2, size=(50, 40))
    script = load_script()
    args = ["--dataset", str(cub), "--model", "resnet18", "--layer", "layer4", "--input-size", "64", "--hard", "2",
            "--ig-steps", "2", "--pictures", "0", "--out", str(tmp_path / "out")]
    assert script.main(args) == 0
    table = (tmp_path / "out" / "table.md").read_text().strip().splitlines()
    assert table[0].startswith("| difficulty | attribution | hard images | PR AUC")
    rows = [line.split(" | ")[:2] for line in table[2:]]
    assert rows == [["| hp", "gradient"], ["| cs", "gradient"], ["| entropy", "gradient"], ["| hp", "ig"],
                    ["| hp", "2ndg"]]
    assert (tmp_path / "out" / "scores.png").exists() and (tmp_path / "out" / "attributions.png").exists()
    assert "| hp | 2ndg | 2 |" in capsys.readouterr().out
