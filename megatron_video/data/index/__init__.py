"""The columnar sample index: every annotated video and image of a data list as Arrow columns.

`format.py` (folder layout, columns, manifest), `sources.py` (streaming the annotation files,
checking and probing each entry), `build.py` (parallel, resumable, atomic builds and the same table
in memory for small lists), `read.py` (the memory-mapped `SampleTable`), `plans.py` (the frame and
resolution rules over whole columns) and `report.py` (what was kept and skipped, in words).
"""
