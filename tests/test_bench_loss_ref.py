"""bench/compiled_loss.py --ref: the eager loss of another checkout (its model/ loaded as a package of its own)
against this one's, alternating in one process, in fp32 or bf16: both timed, their gradients compared."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from bench import compiled_loss


@pytest.mark.parametrize("fp32", [True, False])
def test_ref_times_another_checkouts_eager_loss_beside_this_ones(tmp_path, capsys, fp32):
    ref = tmp_path / "ref"
    ref.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "model"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
    (ref / "model" / "gpt.py").write_text((ref / "model" / "gpt.py").read_text() + "\nREF_MARK = True\n")
    try:
        compiled_loss.main(["--rows", "96", "--d", "32", "--vocab", "200", "--reps", "2", "--ref", str(ref)]
                           + (["--fp32"] if fp32 else []))
        assert sys.modules["ref_model.gpt"].REF_MARK  # the ref's own code ran, not this checkout's
    finally:
        for name in [n for n in sys.modules if n == "ref_model" or n.startswith("ref_model.")]:
            del sys.modules[name]
    out = capsys.readouterr().out
    assert ("fp32" if fp32 else "bf16") in out.splitlines()[0]
    assert out.count("this ") == 1 and out.count(f"ref {ref}") == 1
    ratio, diffs = out.splitlines()[-1].split("; max |grad diff| (first, last param) ")
    assert ratio.startswith("this/ref time ") and float(ratio.split()[-1]) > 0
    assert all(float(d) < 1e-5 for d in diffs.split(", "))  # same loss, same gradients (within fp32 rounding)


def test_ref_without_a_model_package_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        compiled_loss.main(["--rows", "96", "--d", "32", "--vocab", "200", "--ref", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"--ref {tmp_path} has no model/ package" in capsys.readouterr().err.splitlines()[-1]
