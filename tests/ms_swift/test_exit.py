"""What the plugin does at a training process's exit (swift_sophia/ms_swift/register.py): gloo ranks meet before
tearing their process groups down, except a rank that exits on an uncaught exception, which must leave at once so
that its peers fail and torchrun stops the job instead of waiting out the process group's timeout."""
import os
import socket
import subprocess
import sys

RANK = r"""
import os, sys
from datetime import timedelta
import torch, torch.distributed as dist
import swift_sophia.ms_swift.register  # noqa: F401  (what `--external_plugins` imports)
dist.init_process_group("gloo", timeout=timedelta(seconds=600))
if dist.get_rank() == 1:
    raise RuntimeError("rank 1 failed")
dist.all_reduce(torch.ones(1))  # rank 0 waits for rank 1, which never comes
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_fails_exits_and_its_peers_fail_instead_of_waiting(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    ranks = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in ranks]  # both waited out the 600 s timeout before
    finally:
        for p in ranks:
            p.kill()
    assert "rank 1 failed" in outputs[1]
    assert ranks[1].returncode != 0 and ranks[0].returncode != 0, outputs
