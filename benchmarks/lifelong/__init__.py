"""The lifelong benchmark: every method of ``lifealign train`` and the established defences, compared on the same
real preference tasks, seeds and model, with tables shaped like the LifeAlign paper's.

- ``settings``: methods, settings, presets; ``data``: the tasks' data; ``models``: the starting model per seed;
- ``runs``: one (method, seed) as a lifelong recipe; ``harness``: orchestration and resume;
- ``aggregate``: means over seeds, seed-paired gaps, the bar; ``render``: Markdown tables and plots; ``cli``.
"""
