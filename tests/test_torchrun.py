"""`torchrun --nproc_per_node 2 -m fastig attribute --dataset ...` on CPU (gloo) gives the one-process store."""

import os
import subprocess
import sys

import pytest

from fastig.io.store import Store
from fastig.run import PARTS_NAME, STORE_NAME, run
from test_run import assert_same_store, spec, write_list_dataset


@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_store(tmp_path):
    listing = write_list_dataset(tmp_path / "data", 11, seed=5)
    (tmp_path / "data" / "img004.png").write_text("corrupt")  # each rank meets its share of bad data
    run(spec(tmp_path / "one", listing, options={"n_steps": 4}, images_per_batch=2, min_confidence=0.3),
        echo=lambda _: None)
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastig", "attribute", "--model", "centerpixel", "--method", "ig", "--steps", "4",
               "--dataset", str(listing), "--min-confidence", "0.3", "--images-per-batch", "2", "--workers", "0",
               "--no-fsync", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rank 0/2]" in result.stdout and "[rank 1/2]" in result.stdout  # both ranks worked
    assert_same_store(tmp_path / "one" / STORE_NAME, out / STORE_NAME)
    assert not (out / PARTS_NAME).exists()
    with Store.open(out / STORE_NAME) as store:
        assert "img004.png" in list(store.skipped()["ids"])
