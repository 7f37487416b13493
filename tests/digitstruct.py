"""Writes digitStruct.mat files in SVHN format 1's exact layout (MATLAB v7.3, i.e. HDF5), so the
reader is tested against the real structure without the 13,068-image download."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


def write_digit_struct(path: Path, records: list[tuple[str, list[int], list[list[float]]]]) -> None:
    """records: (file name, SVHN labels (10 for the digit 0), boxes [left, top, width, height]).

    As MATLAB writes it: digitStruct/name and digitStruct/bbox are N x 1 arrays of object
    references into #refs#; a name is a (length x 1) uint16 array of character codes; a bbox is
    a group whose label/left/top/width/height are 1x1 doubles for one digit, and n x 1 arrays of
    references to 1x1 doubles for n > 1 digits.
    """
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        names, bboxes = [], []
        for i, (name, labels, boxes) in enumerate(records):
            chars = np.array([[ord(c)] for c in name], dtype=np.uint16)
            names.append(refs.create_dataset(f"name{i}", data=chars).ref)
            group = refs.create_group(f"bbox{i}")
            columns = {
                "label": [float(v) for v in labels],
                "left": [b[0] for b in boxes],
                "top": [b[1] for b in boxes],
                "width": [b[2] for b in boxes],
                "height": [b[3] for b in boxes],
            }
            for key, values in columns.items():
                if len(values) == 1:
                    group.create_dataset(key, data=np.array([[values[0]]], dtype=np.float64))
                else:
                    items = [refs.create_dataset(f"{key}{i}_{j}", data=np.array([[v]], dtype=np.float64)).ref
                             for j, v in enumerate(values)]
                    group.create_dataset(key, data=np.array(items, dtype=h5py.ref_dtype).reshape(-1, 1))
            bboxes.append(group.ref)
        top = f.create_group("digitStruct")
        top.create_dataset("name", data=np.array(names, dtype=h5py.ref_dtype).reshape(-1, 1))
        top.create_dataset("bbox", data=np.array(bboxes, dtype=h5py.ref_dtype).reshape(-1, 1))
