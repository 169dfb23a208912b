"""Print the versions a CI leg runs with, one per line (read by a person, not parsed).

Reads the installed distributions' metadata, so it imports none of them.
"""

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "peft",
    "numpy",
    "hypothesis",
    "pytest",
)


def main() -> None:
    print(f"{'python':13} {platform.python_version()}")
    for name in PACKAGES:
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "not installed"
        print(f"{name:13} {found}")


if __name__ == "__main__":
    main()
