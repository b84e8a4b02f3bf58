# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""``python -m torchtune_medusa.assets prepare|path``."""

import sys

from torchtune_medusa.assets._prepare import main

if __name__ == "__main__":
    sys.exit(main())
