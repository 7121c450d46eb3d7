"""tsrobust: robustness in the teacher-student setting, in JAX.

Reproduces Yang et al., *Understanding Robustness in Teacher-Student Setting: A New
Perspective* (AISTATS 2021). Pure functions over pytrees; each module is importable on
its own (``from tsrobust import data, models, train``):

Setting and networks
  ``data``            subspace bases, projectors, low-rank samplers, off-subspace probes
  ``models``          ReLU MLP teachers and students, random teachers (Tian 2019)
  ``cnn``             CNN teachers and students for images
  ``datasets``        MNIST, Fashion-MNIST, CIFAR-10 from files or bundled; PCA projection
  ``lowrank``         the low-rank setting from explicit arguments: keys, problem, sampler
  ``rng``             the named key streams of every study

Training
  ``train``           losses, optimizers, jitted chunks of steps, vmapped seeds
                      (``train_seeds``), robust methods' losses
  ``methods``         the training methods' registry and grids
  ``teachers``        pretrained CNN teachers and robust models, cached by their spec
  ``robust_dataset``  Ilyas et al.'s robust-feature dataset

Measuring
  ``specialization``  teacher-student correlations, per-layer summaries, weight alignment
  ``metrics``         one student's in/off-subspace specialization in one call
  ``lowrank_eval``    the low-rank evaluation: specialization and the ensemble in S, S_perp, all
  ``image_eval``      the image study's evaluation, shaped alike (CNN students, PCA subspace)
  ``attacks``         PGD, APGD, objectives (fixed label, oracle), CCAT's criterion
  ``objectives``      the attacks' objectives and success criteria (re-exported by ``attacks``)
  ``projections``     the attacks' feasible sets: norm balls, subspaces, input range (likewise)
  ``square``          the Square attack (gradient-free)
  ``evaluate``        the attack ensemble every study uses; worst case per example
  ``ensemble``        the ensemble's attacks, label kinds, presets; one attack on one student
                      (re-exported by ``evaluate``)
  ``outcomes``        an evaluation's ``Result``: worst case per example, invariants,
                      diagnostics, convergence check, records (re-exported by ``evaluate``)
  ``escalation``      the convergence check per group of students, attacking harder where
                      it fails
  ``mechanism``       claim 3's mechanism: off-subspace weight movement, interventions
                      (rescale, transplant), specialization snapshots during training
  ``stats``           correlations, bootstrap and Wilson intervals
  ``clustered``       teacher-level inference: two-stage bootstrap, t-intervals over teachers,
                      paired differences, pooled within-group correlation, coverage simulation
  ``check_results``   the invariants of robust errors in a ``results.csv``
                      (``python -m tsrobust.check_results RUN/results.csv``)
  ``verdicts``        each claim's verdict by the written rule (docs/verdicts.md) from a
                      teacher-level interval; the claims x settings table

Running
  ``sweep``           seeds sharded over devices, checkpoints, compilation cache
  ``numerics``        the precision of every matrix product
  ``io``              atomic result files (JSON, CSV), markdown summaries
  ``plotting``        figures from result files
"""

__version__ = '0.1.0'
