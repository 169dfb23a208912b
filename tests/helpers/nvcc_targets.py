"""The GPU code nvcc itself would embed for a command line: the oracle of
``mdgd_kernels.info.cuda_archs`` (tests/test_info.py, tests/test_setup.py).

``nvcc ... --dryrun`` prints the steps it would run without running them; its
fatbinary step lists one ``--image3=kind=elf,sm=XY`` per machine code (SASS)
target and one ``--image3=kind=ptx,sm=XY`` per PTX target.
"""

from __future__ import annotations

import re
import subprocess


def nvcc_dryrun_targets(command: list[str]) -> list[str]:
    """``sm_XY`` / ``compute_XY`` for each image of ``command``'s dry run, in its order."""
    out = subprocess.run([*command, "--dryrun"], capture_output=True, text=True, timeout=120)
    images = re.findall(r"--image3=kind=(elf|ptx),sm=(\d+\w*)", out.stdout + out.stderr)
    assert images, f"no fatbinary images in nvcc's dry run of {command}:\n{out.stderr[-3000:]}"
    return [("sm_" if kind == "elf" else "compute_") + sm for kind, sm in images]
