"""Part-feature files and how they are read and written: the bottom of the data flow.

:mod:`orgnn.io.features` (the file format, SPEC §7: load, validate, save),
:mod:`orgnn.io.storage` (memory-mapped arrays, rows streamed in chunks) and
:mod:`orgnn.io.atomic` (outputs written as complete sets). Imports nothing else of ours.
"""
