"""Pretrained CNN teachers (and robust models) with a checkpoint cache keyed by their spec.

A *spec* is the plain dict of everything that determines a pretrained
network: the data (``seed``, ``dataset``, ``data_dir``, ``num_train``,
``lowrank_rank``), the architecture, and the training (``teacher_training``
``standard`` or ``pgd`` - L-inf PGD-AT at ``teacher_eps / eps_denominator`` -,
steps, batch, learning rate, PGD steps), plus ``format`` (bumped when the
training code changes meaning) and, for a fine-tuned network, ``init_from``
(the hash of the spec it starts from), and for a network of its own PRNG
stream (an independent robust model) ``stream``. Teachers are a replicated
axis: teacher ``t > 0`` of a study (and a network derived from it) has
``teacher_index: t`` in its spec, which gives it another initialization and
data order (``INDEX_KEY``) and another hash; teacher 0's spec has no such field,
so it is the network (and the cache folder) of a study with one teacher.
``teacher_spec`` builds the spec from a study's config fields (``TEACHER_FIELDS``).

``pretrain_teacher`` trains a CNN on the true labels (cross-entropy, Adam)
into ``<root>/<hash of the spec>`` (``teacher_folder``): ``spec.json`` and the
orbax checkpoints of training (``sweep.Checkpointer``, resumable). A later
call with the same spec reuses the finished checkpoint; a changed field
trains a new network. Pointing several runs at one ``root`` shares teachers.

This module is the one place of the library that writes files besides
``io`` and ``sweep``'s checkpoints: the cache is what it is for.
"""

import hashlib
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tsrobust import attacks
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import io
from tsrobust import rng
from tsrobust import sweep
from tsrobust import train

__all__ = ['TEACHER_TRAININGS', 'ROLES', 'RF_MODEL_INITS', 'TEACHER_CHUNK',
           'TEACHER_FORMAT', 'TEACHER_FIELDS', 'TRAIN_KEY', 'STREAMS', 'INDEX_KEY', 'config_hash',
           'supervised_loss', 'teacher_spec', 'teachers_root', 'teacher_folder',
           'pretrain_teacher']

TEACHER_TRAININGS = ('standard', 'pgd')
ROLES = ('teacher', 'robust_model')
# How the robust model (robust-feature datasets) starts: its own initialization and PRNG stream
# (PGD-AT from scratch, independent of the teacher), or the teacher (fine-tuned by PGD-AT, or
# the teacher itself when that is PGD-trained).
RF_MODEL_INITS = ('scratch', 'teacher')
TEACHER_CHUNK = 250  # steps per jitted chunk (and per checkpoint)
TEACHER_FORMAT = 1   # bump when the teacher's training code changes meaning
# Fields that determine a pretrained teacher (or robust model): its checkpoint folder is
# keyed by a hash of their values.
TEACHER_FIELDS = ('seed', 'dataset', 'data_dir', 'num_train', 'lowrank_rank', 'teacher_conv',
                  'teacher_dense', 'kernel_size', 'pool', 'use_bias', 'teacher_training',
                  'teacher_eps', 'teacher_steps', 'teacher_batch', 'teacher_lr',
                  'teacher_pgd_steps', 'eps_denominator')
# The PRNG stream of pretraining: fold_in(PRNGKey(seed), TRAIN_KEY); a spec with a ``stream``
# (the independent robust model) folds in STREAMS[stream] after that.
TRAIN_KEY = rng.TEACHER_PRETRAINING
STREAMS = {'robust_model': 1}
# A spec with ``teacher_index`` t > 0 folds in INDEX_KEY, then t, after any stream: every
# teacher its own initialization and data order, none equal to a robust model's stream.
INDEX_KEY = 2


def config_hash(obj: Any) -> str:
  """16 hex digits of the SHA-256 of ``obj`` as sorted JSON (``io.to_plain`` values).

  >>> config_hash({'b': (1, 2), 'a': 0.5}) == config_hash({'a': 0.5, 'b': [1, 2]})
  True
  >>> len(config_hash({'a': 1}))
  16
  """
  text = json.dumps(io.to_plain(obj), sort_keys=True)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def supervised_loss(apply_fn: Callable, num_train: int, batch_size: int, *, pgd_steps: int,
                    step_factor: float = 2.5,
                    clip: Optional[Tuple[float, float]] = (0.0, 1.0),
                    eps_warmup: int = 0) -> train.LossFn:
  """Cross-entropy to the true labels, on clean images or L-inf PGD points (PGD-AT).

  Reads ``data_args['train_x'] [N, H, W, C]``, ``data_args['train_y'] [N]``
  and ``data_args['at_eps']`` (0: standard training). The attack maximizes
  the model's own cross-entropy with its parameters frozen
  (``pgd_steps = 0``: no attack is compiled); ``clip``: the pixel range
  (None: unbounded). ``eps_warmup = W > 0``: the budget ramps linearly,
  ``at_eps * min(1, (t + 1) / W)`` at step ``t`` (a ``train.reads_step``
  loss), as PGD-AT from scratch commonly does against stalling.
  """
  if eps_warmup < 0:
    raise ValueError(f'eps_warmup must be >= 0, got {eps_warmup}')

  def loss_fn(params, teacher_params, data_args, key, step=None):
    del teacher_params
    k_data, k_attack = jax.random.split(key)
    idx = jax.random.randint(k_data, (batch_size,), 0, num_train)
    x, y = data_args['train_x'][idx], data_args['train_y'][idx]
    chex.assert_equal_shape_prefix([x, y], 1)
    if pgd_steps:
      frozen = jax.lax.stop_gradient(params)
      eps = data_args['at_eps']
      if eps_warmup:
        eps = eps * jnp.minimum(1.0, (step + 1) / eps_warmup)
      delta = attacks.pgd(lambda xa: attacks.cross_entropy(apply_fn(frozen, xa)[0], y), x,
                          k_attack, eps=eps, alpha=step_factor * eps / pgd_steps,
                          steps=pgd_steps, norm='linf', clip_range=clip)
      x = x + jax.lax.stop_gradient(delta)
    return attacks.cross_entropy(apply_fn(params, x)[0], y).mean()
  return train.reads_step(loss_fn) if eps_warmup and pgd_steps else loss_fn


def teacher_spec(fields: Mapping[str, Any], role: str = 'teacher',
                 teacher_index: int = 0) -> Dict[str, Any]:
  """The spec of a pretrained network: the ``TEACHER_FIELDS`` of ``fields``, as plain values.

  ``data_dir`` is made absolute; a standard teacher's ``teacher_eps`` is 0
  (unused, so it does not key the checkpoint). ``role='robust_model'``: the
  model whose representation builds the robust-feature dataset. With
  ``fields['rf_model_init'] = 'scratch'`` (the default where the field is
  absent) it is an independent network: the teacher's data and architecture,
  L-inf PGD-AT at ``fields['rf_model_eps']`` for ``fields['rf_model_steps']``
  steps from its own initialization, on its own PRNG stream (``stream``,
  derived from ``seed``: another initialization and data order than the
  teacher's for every seed). With ``'teacher'`` it is the teacher itself when
  that is PGD-trained, else the teacher fine-tuned by PGD-AT at
  ``rf_model_eps`` for ``rf_model_steps`` steps (the spec records the
  teacher's hash in ``init_from``).

  ``fields['pgd_warmup'] = f`` (optional, in [0, 1]): every PGD-AT this
  module runs (a PGD teacher, the robust model) ramps its budget linearly
  over its first ``round(f * steps)`` steps (``supervised_loss``'s
  ``eps_warmup``), against PGD-AT from scratch stalling. The spec holds
  ``eps_warmup`` (steps) only when it is > 0, so the specs of networks
  trained without one keep their hash.

  ``teacher_index = t > 0``: teacher ``t`` of a study with several teachers, an
  independent network (``pretrain_teacher`` folds ``INDEX_KEY`` and ``t`` into
  its key); the spec holds ``teacher_index: t``, and so does every spec built
  from it (its fine-tuned robust model; an independent robust model of index t).
  ``t = 0`` adds nothing: teacher 0 is the teacher of a study with one teacher.

  Args:
    fields: a mapping (e.g. a ``ConfigDict``) holding ``TEACHER_FIELDS`` (and,
      for the robust model, ``rf_model_eps`` / ``rf_model_steps`` and
      optionally ``rf_model_init``; optionally ``pgd_warmup``).
    role: ``'teacher'`` or ``'robust_model'``.
    teacher_index: which teacher (>= 0; 0: the study's first, or only, teacher).
  """
  if role not in ROLES:
    raise ValueError(f"role must be 'teacher' or 'robust_model', got {role!r}")
  if isinstance(teacher_index, bool) or int(teacher_index) != teacher_index or teacher_index < 0:
    raise ValueError(f'teacher_index must be an integer >= 0, got {teacher_index!r}')
  spec = {f: io.to_plain(fields[f]) for f in TEACHER_FIELDS}
  if teacher_index:  # only when > 0: teacher 0 keeps the hash of a single-teacher study
    spec['teacher_index'] = int(teacher_index)
  spec['data_dir'] = os.path.abspath(spec['data_dir']) if spec['data_dir'] else ''
  if spec['teacher_training'] == 'standard':
    spec['teacher_eps'] = 0.0  # unused: does not key the checkpoint
  spec['format'] = TEACHER_FORMAT
  warmup = float(fields.get('pgd_warmup', 0.0))
  if not 0 <= warmup <= 1:
    raise ValueError(f'pgd_warmup must be in [0, 1], got {warmup!r}')

  def with_warmup(s):  # only when on: specs trained without one keep their hash
    steps = round(warmup * s['teacher_steps']) if s['teacher_training'] == 'pgd' else 0
    return dict(s, eps_warmup=steps) if steps else s
  teacher = with_warmup(spec)
  if role == 'teacher':
    return teacher
  init = fields.get('rf_model_init', 'scratch')
  if init not in RF_MODEL_INITS:
    raise ValueError(f'rf_model_init must be one of {RF_MODEL_INITS}, got {init!r}')
  robust = dict(teacher_training='pgd', teacher_eps=io.to_plain(fields['rf_model_eps']),
                teacher_steps=fields['rf_model_steps'])
  if init == 'scratch':
    return with_warmup(dict(spec, **robust, stream='robust_model'))
  if fields['teacher_training'] == 'pgd':
    return teacher  # the PGD teacher itself
  # PGD-AT fine-tuning of the (standard) teacher.
  return with_warmup(dict(spec, **robust, init_from=config_hash(teacher)))


def teachers_root(teacher_dir: str, workdir: str) -> str:
  """Where pretrained teachers live: ``teacher_dir`` (absolute), or ``workdir/teachers``.

  >>> teachers_root('', '/runs/real'), teachers_root('/shared/teachers', '/runs/real')
  ('/runs/real/teachers', '/shared/teachers')
  """
  return os.path.abspath(teacher_dir or os.path.join(workdir, 'teachers'))


def teacher_folder(root: str, spec: Mapping[str, Any]) -> str:
  """``root/<hash of spec>``."""
  return os.path.join(root, config_hash(dict(spec)))


def pretrain_teacher(spec: Mapping[str, Any], model: cnn.CNN, dataset: datasets.Dataset,
                     root: str, stage: str = 'teacher', init: Optional[Any] = None,
                     on_chunk: Optional[Callable[[Dict[str, float]], None]] = None,
                     checkpoint_every_sec: float = 0.0) -> Tuple[Any, Dict[str, Any]]:
  """Trains (or reloads) a CNN on the true labels of ``dataset``; checkpointed with orbax.

  The folder ``teacher_folder(root, spec)`` holds ``spec.json`` and the
  checkpoints of training (resumable). A finished checkpoint of the same
  spec is reused as is; a folder whose ``spec.json`` differs from ``spec``
  is refused (a hash collision or an edited folder). The keys are
  ``fold_in(PRNGKey(spec['seed']), TRAIN_KEY)`` (then ``STREAMS[spec['stream']]``
  where the spec has a stream, then ``INDEX_KEY`` and ``spec['teacher_index']``
  where it has an index), split into initialization and training.

  Args:
    spec: ``teacher_spec``'s dict.
    model: the CNN (``cnn.make_cnn``) of the spec's architecture.
    dataset: ``train_x [N, H, W, C]``, ``train_y [N]`` train it.
    root: the cache folder.
    stage: a name for errors and progress (``'teacher'``, ``'robust_model'``).
    init: starting parameters (fine-tuning; the spec must say where they come
      from, as ``teacher_spec``'s ``init_from`` does), else a fresh
      initialization (from the spec's ``stream`` where it has one).
    on_chunk: progress callback of ``train.train_seeds``.
    checkpoint_every_sec: save training checkpoints at most this often (and
      at the end); 0: after every chunk (``sweep.Checkpointer``'s ``every_sec``).

  Returns:
    ``(params, info)``: the parameters (one model, no seeds axis, numpy) and
    ``{'folder', 'hash', 'reused', 'final_loss'}``.

  Raises:
    ValueError: the folder's ``spec.json`` differs from ``spec``.
    RuntimeError: training diverged.
  """
  chex.assert_equal_shape_prefix([dataset.train_x, dataset.train_y], 1)
  folder = teacher_folder(root, spec)
  spec_path = os.path.join(folder, 'spec.json')
  plain = json.loads(json.dumps(io.to_plain(dict(spec))))
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      stored = json.load(f)
    if stored != plain:
      raise ValueError(f'{spec_path} holds a different teacher config than its hash says; '
                       f'delete {folder} to retrain')
  elif jax.process_index() == 0:
    io.write_json(spec_path, plain)
  pgd = spec['teacher_training'] == 'pgd'
  eps = spec['teacher_eps'] / spec['eps_denominator'] if pgd else 0.0
  n = dataset.train_x.shape[0]
  clip = None if spec['lowrank_rank'] else (0.0, 1.0)
  loss_fn = supervised_loss(model.apply, n, spec['teacher_batch'],
                            pgd_steps=spec['teacher_pgd_steps'] if pgd else 0, clip=clip,
                            eps_warmup=spec.get('eps_warmup', 0) if pgd else 0)
  optimizer = train.make_optimizer('adam', spec['teacher_lr'])
  key = jax.random.fold_in(jax.random.PRNGKey(spec['seed']), TRAIN_KEY)
  if 'stream' in spec:
    key = jax.random.fold_in(key, STREAMS[spec['stream']])
  if spec.get('teacher_index'):
    key = jax.random.fold_in(jax.random.fold_in(key, INDEX_KEY), spec['teacher_index'])
  k_init, k_train = jax.random.split(key)
  params = cnn.init_params(k_init, model, dataset.image_shape) if init is None else init
  add_axis = lambda tree: jax.tree_util.tree_map(lambda v: jnp.asarray(v)[None], tree)
  state = add_axis(train.init_state(params, optimizer))
  data_args = add_axis({'train_x': dataset.train_x, 'train_y': dataset.train_y,
                        'at_eps': jnp.float32(eps)})
  steps = spec['teacher_steps']
  checkpointer = sweep.Checkpointer(os.path.join(folder, 'checkpoints'),
                                    every_sec=checkpoint_every_sec)
  reused = steps > 0 and checkpointer.latest_step() == steps
  try:
    state, losses = train.train_seeds(
        loss_fn, optimizer, state, jnp.zeros((1,)), data_args, k_train[None],
        num_steps=steps, chunk_steps=min(TEACHER_CHUNK, max(steps, 1)),
        on_chunk=on_chunk, checkpointer=checkpointer)
  except train.TrainingDivergedError as e:
    raise RuntimeError(f'{e} ({stage}); lower config.teacher_lr') from e
  finally:
    checkpointer.close()
  params = jax.tree_util.tree_map(lambda v: np.asarray(v[0]), sweep.to_host(state.params))
  final = float(losses[0, -1]) if losses.size else None
  return params, {'folder': folder, 'hash': os.path.basename(folder), 'reused': bool(reused),
                  'final_loss': final}
