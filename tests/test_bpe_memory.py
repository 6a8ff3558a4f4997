"""Memory of encoding one long pre-token (issue 18): megabytes of one character are one pre-token,
and the merge loop over it once held ~150 bytes of RAM per byte in Python objects (22.5 MB of NUL
bytes peaked at 2.7 GB). The budget is 32 bytes of peak RSS per byte.

Measured in a subprocess (its own peak RSS: ``VmHWM``, which ``ru_maxrss`` reports, reset just before
encoding; an address-space ``setrlimit`` is unreliable once torch is imported), less the RSS it had
before encoding (interpreter, imports, tokenizer), on a
1.5 MB pre-token: large enough that fixed costs (a few MB) stay small against the budget (48 MB),
small enough to take a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 32  # bytes of peak RSS per byte of the longest pre-token

SCRIPT = r"""
import json, os, resource, sys
from flm.tokenizer import Tokenizer, encode_file

text_path, out_path = sys.argv[1:3]
# GPT-2's merges of "a" runs, in GPT-2's order (constructing GPT-2's tokenizer takes a second longer).
vocab = {i: bytes([i]) for i in range(256)} | {256: b"aa", 257: b"aaaa", 258: b"aaa"}
tok = Tokenizer(vocab, [(b"a", b"a"), (b"aa", b"aa"), (b"aa", b"a")], ["<|endoftext|>"])

def status(key):  # a kB field of /proc/self/status, in bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

# Reset the peak RSS (VmHWM, which ru_maxrss reports) to the current RSS: an earlier peak (imports,
# construction) above the RSS now, e.g. after the kernel reclaimed pages, would hide or inflate the growth.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
count = encode_file(tok, text_path, out_path, num_workers=1, progress=False)
peak = status("VmHWM")
assert peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "peak": peak, "count": count}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kilobytes on Linux only")
def test_encode_file_on_one_long_pretoken_stays_within_32_bytes_per_byte(tmp_path):
    n = 1_500_000
    text = tmp_path / "one_char.txt"
    text.write_bytes(b"a" * n)  # one pre-token: merged into "aa", then "aaaa" (and "aaa" is tried)
    out = tmp_path / "ids.bin"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(text), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["count"] == n // 4
    assert np.array_equal(np.unique(np.fromfile(out, dtype=np.uint16)), [257])  # all "aaaa"
    per_byte = (r["peak"] - r["before"]) / n
    assert per_byte <= BUDGET, f"encoding {n / 1e6:.1f} MB of one character took {per_byte:.0f} bytes of RSS per byte"
