"""The embedded task (checkable word puzzles with a sloppy teacher) and the ``fastdpo demo`` pipeline."""
