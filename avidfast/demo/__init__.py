"""`avidfast demo` (and `make demo`): the whole method on a laptop CPU, with nothing downloaded.

An application on the top floor of the package: it uses the data, training and evaluation layers
and nothing below it uses it.

- run.py: the steps (synthetic sets, statistics, Cross-AVID training, measurements on held-out
  clips for the trained network and the same network at initialisation), results.json
- report.py: the goals, the verdict, the printed table and the README's demo table
- pictures.py: loss_curve.png, retrieval_grid.png and similarity_matrix.png
"""
from avidfast.demo.report import summary
from avidfast.demo.run import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo", "summary"]
