# Copyright (c) torchtune-medusa contributors.
# All rights reserved.
#
# This source code is licensed under the BSD-style license found in the
# LICENSE file in the root directory of this source tree.
"""Loading helpers shared by the dataset builders."""

import glob
import os
from typing import Any, Dict, List, Optional, Tuple, Union

from datasets import Dataset, load_dataset

# Sources that ``datasets`` loads from local files given in ``data_files``.
LOCAL_SOURCES = ("json", "csv", "parquet", "text", "arrow")


def check_local_data_file(builder: str, path: Union[str, os.PathLike]) -> None:
    """Refuse a data file that holds nothing but whitespace (``datasets`` ends such a file in a bare
    ``StopIteration``). Reads only up to the first non-blank byte.

    Args:
        builder (str): name of the caller, used in the message.
        path (Union[str, os.PathLike]): an existing local file.

    Raises:
        ValueError: the file is empty; the message names it.
    """
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                raise ValueError(
                    f"{builder}: data file {os.fspath(path)!r} is empty (no records): write the data into it, or point "
                    "data_files at the file that holds them"
                )
            if chunk.strip():
                return


def load_local_dataset(
    builder: str,
    *,
    source: str,
    data_files: Optional[Union[str, List[str]]],
    split: str,
    column: Optional[Tuple[str, str]] = None,
    **load_dataset_kwargs: Dict[str, Any],
) -> Dataset:
    """``datasets.load_dataset(source, data_files=..., split=...)``, first checking that local files exist.

    ``datasets`` reports a missing file late and obscurely; this names the argument and the file instead.

    Args:
        builder (str): name of the calling builder, used in error messages.
        source (str): ``datasets`` source, e.g. "json" or "text" for local files, or a Hub-style path.
        data_files (Optional[Union[str, List[str]]]): local file(s) or glob(s).
        split (str): split to load.
        column (Optional[Tuple[str, str]]): ``(argument name, column)`` that the data must have.
        **load_dataset_kwargs: passed on to ``load_dataset``.

    Returns:
        Dataset: the loaded split.

    Raises:
        ValueError: if a local ``source`` is given without ``data_files``.
        ValueError: if the data lacks ``column``.
        ValueError: if a local file is empty.
        FileNotFoundError: if a listed file, or every match of a glob, is missing.
    """
    if data_files is not None:
        single = isinstance(data_files, (str, os.PathLike))
        files = [os.fspath(f) for f in ([data_files] if single else data_files)]
        load_dataset_kwargs["data_files"] = files[0] if single else files
    if source in LOCAL_SOURCES:
        if not data_files:
            raise ValueError(f"{builder}: source={source!r} needs data_files (a local file, list or glob)")
        for f in files:
            if "://" in f:
                continue
            matches = glob.glob(f) if glob.has_magic(f) else [f] if os.path.exists(f) else []
            if not matches:
                raise FileNotFoundError(f"{builder}: data_files entry {f!r} does not exist")
            for match in matches:
                if os.path.isfile(match):
                    check_local_data_file(builder, match)
    try:
        data = load_dataset(source, split=split, **load_dataset_kwargs)
    except StopIteration as e:  # how `datasets` reports a file without records
        raise ValueError(f"{builder}: no records in data_files={data_files!r}") from e
    if column is not None and column[1] not in data.column_names:
        raise ValueError(
            f"{builder}: {column[0]}={column[1]!r} is not in the data; its columns are {data.column_names}"
        )
    return data
