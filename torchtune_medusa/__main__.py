# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``python -m torchtune_medusa ls|cp|cat|run ...``: torchtune's ``tune`` CLI with our recipes registered.

``tune`` itself sees our recipes through the ``.pth`` start-up hook; this entry point is the fallback for
environments that skip ``.pth`` files (``python -S``, ``pip install --target`` + ``PYTHONPATH``).
"""

import sys

from torchtune_medusa import _tune_hook


def main() -> None:
    _tune_hook.install()
    from torchtune._cli.tune import main as tune_main

    sys.argv[0] = "tune"
    tune_main()


if __name__ == "__main__":
    main()
