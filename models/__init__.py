"""The model: feature extractors, coreset, PatchCore.

OpenMP threads that wait for work sleep instead of spinning. Fitting decodes and preprocesses
photos on worker threads while torch runs the backbone; spinning OpenMP threads would take the
cores those workers need (on 2 cores a screw fit's feature stage took 30% longer). The setting is
read when torch loads its OpenMP runtime, so it is made here, before any module of this package
imports torch; a value already in the environment is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
