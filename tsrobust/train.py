"""Training students from a teacher: losses, optimizers, jitted chunks of steps.

The pieces compose as in flax/examples:

* a *loss function* ``loss_fn(params, teacher_params, data_args, key) -> scalar``
  draws its own batch from ``key`` (``teacher_regression_loss`` is the
  standard one; robust methods supply others);
* ``train_step`` is one optimizer step of it, for one seed (a loss marked by
  ``reads_step`` also gets the global step, for schedules);
* ``make_chunk_fn`` scans ``length`` steps, for one seed. The step's key is
  ``fold_in(key, global_step)``, so the trajectory does not depend on how the
  run is cut into chunks;
* ``train_seeds`` is the thin driver: ``jit(vmap(chunk))`` over a leading
  seeds axis, called chunk after chunk, checking for non-finite losses and
  reporting progress through a callback (the library never prints).
"""

import functools
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsrobust import attacks
from tsrobust import sweep

__all__ = ['LOSSES', 'OPTIMIZERS', 'SCHEDULES', 'LossFn', 'TrainState',
           'TrainingDivergedError', 'per_example_teacher_loss', 'teacher_loss',
           'make_optimizer', 'init_state', 'teacher_regression_loss', 'NOISE_KINDS',
           'noise_augmentation', 'pgd_augmentation', 'ccat_loss', 'reads_step',
           'train_step', 'make_chunk_fn', 'train_seeds']

LOSSES = ('mse', 'ce_argmax', 'ce_soft')
OPTIMIZERS = ('sgd', 'momentum', 'adam')
SCHEDULES = ('constant', 'cosine')

LossFn = Callable[[chex.ArrayTree, chex.ArrayTree, Any, chex.PRNGKey], chex.Array]


class TrainState(NamedTuple):
  """Per-seed training state: parameters, optimizer state, step count."""
  params: chex.ArrayTree
  opt_state: optax.OptState
  step: chex.Array


class TrainingDivergedError(RuntimeError):
  """A loss or parameter became non-finite.

  Attributes:
    last_good_state: the (batched) state at the end of the last finite chunk.
    step: the step count of ``last_good_state``.
    bad_seeds: indices along the seeds axis that went non-finite.
  """

  def __init__(self, message: str, last_good_state: TrainState, step: int, bad_seeds):
    super().__init__(message)
    self.last_good_state = last_good_state
    self.step = step
    self.bad_seeds = bad_seeds


def per_example_teacher_loss(student_out: chex.Array, teacher_out: chex.Array,
                             loss: str) -> chex.Array:
  """``[B]`` loss of student outputs against teacher outputs, both ``[B, C]``.

  ``'mse'``: mean over outputs of ``(s - t)^2`` (Tian's regression);
  ``'ce_argmax'``: cross-entropy to the teacher's argmax;
  ``'ce_soft'``: cross-entropy to the teacher's softmax (distillation).
  Gradients flow into both arguments (attacks differentiate through the
  teacher); ``teacher_loss`` is the training loss with the teacher held fixed.
  """
  chex.assert_equal_shape([student_out, teacher_out])
  if loss == 'mse':
    return jnp.mean((student_out - teacher_out) ** 2, axis=-1)
  logp = jax.nn.log_softmax(student_out)
  if loss == 'ce_argmax':
    labels = teacher_out.argmax(-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  if loss == 'ce_soft':
    return -(jax.nn.softmax(teacher_out) * logp).sum(-1)
  raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')


def teacher_loss(student_out: chex.Array, teacher_out: chex.Array, loss: str) -> chex.Array:
  """Scalar training loss: batch mean of ``per_example_teacher_loss``, teacher held fixed.

  >>> float(teacher_loss(jnp.array([[1.0, 2.0]]), jnp.array([[1.0, 4.0]]), 'mse'))
  2.0
  """
  return jnp.mean(per_example_teacher_loss(student_out, jax.lax.stop_gradient(teacher_out),
                                           loss))


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, schedule: str = 'constant',
                   total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """An optax optimizer by name.

  Args:
    name: ``'sgd'``, ``'momentum'`` (SGD with heavy-ball momentum) or ``'adam'``.
    learning_rate: peak learning rate (> 0).
    momentum: momentum for ``'momentum'``, in [0, 1).
    weight_decay: coefficient of an L2 penalty added to the gradient
      (``add_decayed_weights`` before the optimizer), >= 0.
    schedule: ``'constant'`` or ``'cosine'`` (decay to 0 over ``total_steps``).
    total_steps: number of steps, needed by ``'cosine'``.

  >>> opt = make_optimizer('momentum', 0.1)
  >>> state = init_state({'w': jnp.zeros(2)}, opt)
  >>> int(state.step)
  0
  >>> make_optimizer('adamw', 0.1)
  Traceback (most recent call last):
  ValueError: optimizer must be one of ('sgd', 'momentum', 'adam'), got 'adamw'
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}')
  if schedule not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate!r}')
  if not 0 <= momentum < 1:
    raise ValueError(f'momentum must be in [0, 1), got {momentum!r}')
  if weight_decay < 0:
    raise ValueError(f'weight_decay must be >= 0, got {weight_decay!r}')
  lr = learning_rate
  if schedule == 'cosine':
    if not total_steps or total_steps < 1:
      raise ValueError(f'total_steps must be >= 1 for a cosine schedule, got {total_steps!r}')
    lr = optax.cosine_decay_schedule(learning_rate, total_steps)
  if name == 'sgd':
    opt = optax.sgd(lr)
  elif name == 'momentum':
    opt = optax.sgd(lr, momentum=momentum)
  else:
    opt = optax.adam(lr)
  if weight_decay > 0:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  return opt


def init_state(params: chex.ArrayTree, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh ``TrainState`` for ``params`` (one seed; vmap it for many)."""
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def teacher_regression_loss(student_apply: Callable, teacher_apply: Callable, loss: str,
                            sample_inputs: Callable, batch_size: int,
                            transform: Optional[Callable] = None,
                            label_at: str = 'transformed') -> LossFn:
  """Training on teacher labels, optionally at transformed inputs.

  Each step draws ``x`` with ``sample_inputs``, maps it to ``x' =
  transform(params, teacher_params, data_args, x, key)`` (augmentation, PGD
  points; the identity when ``transform`` is None), and fits the student at
  ``x'`` to the teacher at ``x'`` (``label_at='transformed'``, the oracle) or
  at ``x`` (``label_at='clean'``, fixed labels). ``x'`` is a constant for the
  gradient.

  Args:
    student_apply, teacher_apply: ``(params, x) -> (outputs, activations)``.
    loss: one of ``LOSSES``.
    sample_inputs: ``(key, data_args, n) -> [n, d]`` inputs.
    batch_size: inputs per step.
    transform: ``(params, teacher_params, data_args, x, key) -> x'`` or None.
    label_at: ``'transformed'`` or ``'clean'``.

  Returns:
    ``loss_fn(params, teacher_params, data_args, key) -> scalar``.
  """
  if loss not in LOSSES:
    raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
  if label_at not in ('transformed', 'clean'):
    raise ValueError(f"label_at must be 'transformed' or 'clean', got {label_at!r}")

  def loss_fn(params, teacher_params, data_args, key):
    k_data, k_transform = jax.random.split(key)
    x = sample_inputs(k_data, data_args, batch_size)
    x_train = x
    if transform is not None:
      x_train = jax.lax.stop_gradient(
          transform(params, teacher_params, data_args, x, k_transform))
    x_label = x_train if label_at == 'transformed' else x
    return teacher_loss(student_apply(params, x_train)[0],
                        teacher_apply(teacher_params, x_label)[0], loss)
  return loss_fn


# ----------------------------------------------------------------------------
# Robust training methods. Their hyper-parameters that do not change shapes
# (budgets, noise scales, fractions, projectors) are read from ``data_args``,
# so a grid of them is one more vmapped axis: no recompiling per grid point.
# ----------------------------------------------------------------------------


def _leading_mask(batch_size: int, fraction: chex.Numeric) -> chex.Array:
  """``[B]`` bool: the first ``round(fraction * B)`` examples are selected."""
  return jnp.arange(batch_size) < jnp.round(fraction * batch_size)


def _where_rows(mask: chex.Array, a: chex.Array, b: chex.Array) -> chex.Array:
  return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


NOISE_KINDS = ('orthogonal', 'isotropic')


def noise_augmentation(kind: str) -> Callable:
  """Transform adding Gaussian noise to a fraction of the batch (PAPER.md claim 5).

  ``'orthogonal'``: ``x + P_perp xi`` (noise only in the complement of the
  data subspace); ``'isotropic'``: ``x + xi`` (the control). ``xi ~ N(0,
  aug_scale^2 I)``. Reads ``data_args['aug_scale']``,
  ``data_args['aug_fraction']`` and (orthogonal) ``data_args['projector']``
  (``[D, D]`` over the flattened input, so images ``[B, H, W, C]`` work too).
  Use with ``teacher_regression_loss(..., label_at='transformed')``: the
  teacher labels the noisy points.
  """
  if kind not in NOISE_KINDS:
    raise ValueError(f'noise kind must be one of {NOISE_KINDS}, got {kind!r}')

  def transform(params, teacher_params, data_args, x, key):
    del params, teacher_params
    xi = data_args['aug_scale'] * jax.random.normal(key, x.shape, x.dtype)
    if kind == 'orthogonal':
      xi = xi - attacks.project_onto_subspace(xi, data_args['projector'])
    return x + _where_rows(_leading_mask(x.shape[0], data_args['aug_fraction']), xi, 0.0)
  return transform


def pgd_augmentation(student_apply: Callable, teacher_apply: Callable, loss: str, *,
                     norm: str, steps: int, step_factor: float = 2.5, label: str = 'oracle',
                     restarts: int = 1,
                     clip_range: Optional[Tuple[float, float]] = None) -> Callable:
  """Transform replacing a fraction of the batch by PGD points (Madry et al. 2018).

  The attack maximizes the per-example training ``loss`` between the student
  (parameters held fixed during the attack) and its target: the teacher at
  the perturbed point (``label='oracle'``) or at the clean point
  (``'fixed'``). Pair it with ``teacher_regression_loss(..., label_at=
  'transformed' if label == 'oracle' else 'clean')``.

  Reads ``data_args['at_eps']`` (budget), ``data_args['at_fraction']`` and,
  when present, ``data_args['at_projector']`` (``[d, d]``, ``P`` to keep the
  attack in the data subspace; absent: unconstrained, which skips a
  ``d x d`` product per step). ``clip_range``: valid input range of
  ``x + delta`` (images: ``(0, 1)``), as in ``attacks.pgd``.
  """
  if label not in attacks.LABELS:
    raise ValueError(f'label must be one of {attacks.LABELS}, got {label!r}')

  def transform(params, teacher_params, data_args, x, key):
    params = jax.lax.stop_gradient(params)
    s_fn = lambda v: student_apply(params, v)[0]
    t_fn = lambda v: teacher_apply(teacher_params, v)[0]
    if label == 'oracle':
      objective = lambda xa: per_example_teacher_loss(s_fn(xa), t_fn(xa), loss)
    else:
      t_clean = t_fn(x)
      objective = lambda xa: per_example_teacher_loss(s_fn(xa), t_clean, loss)
    eps = data_args['at_eps']
    delta = attacks.pgd(objective, x, key, eps=eps, alpha=step_factor * eps / steps,
                        steps=steps, norm=norm, restarts=restarts,
                        projector=data_args.get('at_projector'), clip_range=clip_range)
    return x + _where_rows(_leading_mask(x.shape[0], data_args['at_fraction']), delta, 0.0)
  return transform


def ccat_loss(student_apply: Callable, teacher_apply: Callable, sample_inputs: Callable,
              batch_size: int, *, norm: str, steps: int, step_factor: float = 2.5,
              rho: float = 10.0,
              clip_range: Optional[Tuple[float, float]] = None) -> LossFn:
  """Confidence-calibrated adversarial training (Stutz, Hein, Schiele 2020).

  Labels ``y`` are the teacher's argmax at the clean points. The first half
  of each batch is clean with one-hot targets; the second half is attacked
  by PGD maximizing ``max_{k != y} softmax(f(x + delta))_k`` and gets the
  target ``lam * onehot(y) + (1 - lam) / C`` with
  ``lam = (1 - min(1, ||delta|| / eps)) ** rho``. The loss is the
  cross-entropy to these targets, averaged over the batch.

  Reads ``data_args['ccat_eps']`` and, when present,
  ``data_args['ccat_projector']`` (absent: unconstrained). ``clip_range``:
  valid input range of ``x + delta``, as in ``attacks.pgd``.
  """
  if batch_size < 2:
    raise ValueError(f'batch_size must be >= 2 for CCAT (half clean, half adversarial), '
                     f'got {batch_size}')

  def loss_fn(params, teacher_params, data_args, key):
    k_data, k_attack = jax.random.split(key)
    x = sample_inputs(k_data, data_args, batch_size)
    t = teacher_apply(teacher_params, x)[0]
    y = t.argmax(-1)
    num_classes = t.shape[-1]
    half = batch_size // 2
    frozen = jax.lax.stop_gradient(params)
    eps = data_args['ccat_eps']
    delta = attacks.pgd(attacks.ccat_objective(lambda v: student_apply(frozen, v)[0], y[half:]),
                        x[half:], k_attack, eps=eps, alpha=step_factor * eps / steps,
                        steps=steps, norm=norm, projector=data_args.get('ccat_projector'),
                        clip_range=clip_range)
    delta = jax.lax.stop_gradient(delta)
    lam = attacks.ccat_lambda(delta, eps, norm, rho)
    targets = jnp.concatenate([jax.nn.one_hot(y[:half], num_classes),
                               attacks.ccat_target(y[half:], lam, num_classes)])
    inputs = jnp.concatenate([x[:half], x[half:] + delta])
    logp = jax.nn.log_softmax(student_apply(params, inputs)[0])
    return -jnp.mean((targets * logp).sum(-1))
  return loss_fn


def reads_step(loss_fn: Callable) -> Callable:
  """Marks ``loss_fn(params, teacher_params, data_args, key, step)`` as reading the step.

  ``train_step`` passes such a loss ``state.step`` (an int32 scalar: the
  0-based global step being taken), so a hyper-parameter can follow a
  schedule (e.g. an attack budget's warm-up) inside one compiled chunk.
  Returns ``loss_fn`` itself, marked.
  """
  loss_fn.reads_step = True
  return loss_fn


def train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, state: TrainState,
               teacher_params: chex.ArrayTree, data_args: Any,
               key: chex.PRNGKey) -> Tuple[TrainState, chex.Array]:
  """One optimizer step for one seed. Returns ``(new_state, loss)``.

  A loss marked by ``reads_step`` also gets ``state.step``.
  """
  extra = (state.step,) if getattr(loss_fn, 'reads_step', False) else ()
  loss, grads = jax.value_and_grad(loss_fn)(state.params, teacher_params, data_args, key,
                                            *extra)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return TrainState(optax.apply_updates(state.params, updates), opt_state,
                    state.step + 1), loss


def make_chunk_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                  length: int) -> Callable:
  """``chunk(state, teacher_params, data_args, key) -> (state, losses [length])``, one seed.

  Step ``t`` (global) uses ``jax.random.fold_in(key, t)``.
  """
  def chunk(state, teacher_params, data_args, key):
    def body(st, _):
      return train_step(loss_fn, optimizer, st, teacher_params, data_args,
                        jax.random.fold_in(key, st.step))
    return jax.lax.scan(body, state, None, length=length)
  return chunk


@functools.lru_cache(maxsize=64)
def _batched_chunk(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                   length: int, shared: bool = False, batching: str = 'vmap') -> Callable:
  """``jit(vmap(chunk))`` (or, with ``batching='map'``, each device's seeds one at a time:
  ``sweep.map_over_seeds``), one per (loss, optimizer, length, shared, batching): later
  calls of ``train_seeds`` (other ranks, resumed runs) reuse the compiled executable.

  ``shared``: the chunk takes a fifth argument, a dict of arrays without a
  seeds axis (``in_axes=None``: one copy for every seed), merged into each
  seed's ``data_args`` dict.
  """
  chunk = make_chunk_fn(loss_fn, optimizer, length)
  if not shared:
    fn, batched = chunk, (True,) * 4
  else:
    def fn(state, teacher_params, data_args, key, shared_args):
      return chunk(state, teacher_params, {**shared_args, **data_args}, key)
    batched = (True,) * 4 + (False,)
  if batching == 'map':
    return jax.jit(sweep.map_over_seeds(fn, batched))
  return jax.jit(jax.vmap(fn, in_axes=tuple(0 if b else None for b in batched)))


@jax.jit
def _chunk_finite(params, losses) -> chex.Array:
  """``[S]`` bool: a chunk's parameters (leading seeds axis) and losses ``[S, steps]`` are
  all finite, per seed."""
  leaves = [jnp.isfinite(l.reshape(l.shape[0], -1)).all(-1)
            for l in jax.tree_util.tree_leaves(params) if jnp.issubdtype(l.dtype, jnp.inexact)]
  return jnp.stack(leaves).all(0) & jnp.isfinite(losses).all(-1)


def train_seeds(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                state: TrainState, teacher_params: chex.ArrayTree, data_args: Any,
                keys: chex.PRNGKey, *, num_steps: int, chunk_steps: int,
                on_chunk: Optional[Callable[[Dict[str, float]], None]] = None,
                checkpointer: Optional[sweep.Checkpointer] = None,
                shared_args: Optional[Dict[str, Any]] = None,
                batching: str = 'vmap') -> Tuple[TrainState, np.ndarray]:
  """Trains a batch of seeds for ``num_steps`` steps in jitted chunks.

  Every argument but the static ones and ``shared_args`` has a leading seeds
  axis ``[S, ...]`` (tile a shared teacher); arrays may be sharded over
  devices along it (``sweep.shard_seeds``), and the outputs keep that sharding.

  Args:
    loss_fn, optimizer: as for ``train_step``.
    state: batched ``TrainState`` (``state.step`` equal across seeds).
    teacher_params, data_args: batched pytrees (``data_args`` a dict when
      ``shared_args`` is given).
    keys: ``[S]`` training keys (one per seed).
    num_steps: steps to take (>= 0); the run ends at ``state.step + num_steps``.
    chunk_steps: steps per jitted chunk (>= 1). A shorter last chunk compiles
      once more.
    on_chunk: called after each chunk with ``step``, ``num_steps``,
      ``steps_per_sec``, ``eta_sec``, ``loss`` (mean over seeds of the
      chunk's last loss), ``resumed_from`` (the step training resumed from,
      None when it started afresh) and ``last_checkpoint`` (the step of the
      newest checkpoint, None when none).
    checkpointer: when given, the state and loss history are saved after
      every chunk (at most every ``checkpointer.every_sec`` seconds when that
      is set, and always after the last chunk), and training resumes from its
      newest checkpoint (of this same run: same ``state`` structure,
      ``num_steps`` and ``chunk_steps``).
      Because step ``t`` uses ``fold_in(key, t)``, a resumed run ends in the
      same state as an uninterrupted one.
    shared_args: a dict of arrays every seed reads, WITHOUT a seeds axis
      (e.g. a training set): passed unbatched (``vmap`` ``in_axes=None``) and
      merged into each seed's ``data_args`` dict (a key in both is an error),
      so memory is O(data + S * params) instead of O(S * data). On several
      devices it is replicated, once per device.
    batching: ``'vmap'`` (every seed of a device at once) or ``'map'`` (each device
      runs its own seeds one at a time, ``sweep.map_over_seeds``: the same values up to
      float rounding; on a CPU the image study's CNN steps run 1.8-2.4x faster this way,
      ``sweep.default_seed_batching()`` picks it there).

  Returns:
    ``(state, losses)``: the final batched state and ``[S, num_chunks]`` mean
    loss of every chunk.

  Raises:
    TrainingDivergedError: a loss or parameter went non-finite; the error
      carries the state after the last finite chunk.

  Two students of a 4 -> 3 -> 2 teacher, trained on fresh Gaussian inputs:

  >>> from tsrobust import models
  >>> teacher = models.MLP((3,), 2)
  >>> student = models.student_of(teacher, width_mult=2)
  >>> keys = jax.random.split(jax.random.PRNGKey(0), 3)
  >>> tparams = jax.vmap(lambda k: models.random_teacher_params(k, teacher, 4))(keys[0:2])
  >>> sparams = jax.vmap(lambda k: student.init(k, jnp.zeros((1, 4))))(keys[1:3])
  >>> sample = lambda key, data_args, n: jax.random.normal(key, (n, 4))
  >>> loss_fn = teacher_regression_loss(student.apply, teacher.apply, 'mse', sample, 32)
  >>> opt = make_optimizer('momentum', 0.05)
  >>> state = jax.vmap(lambda p: init_state(p, opt))(sparams)
  >>> state, losses = train_seeds(loss_fn, opt, state, tparams, jnp.zeros(2), keys[0:2],
  ...                             num_steps=400, chunk_steps=200)
  >>> losses.shape, bool((losses[:, -1] < losses[:, 0]).all())  # [seeds, chunks]
  ((2, 2), True)
  """
  if num_steps < 0:
    raise ValueError(f'num_steps must be >= 0, got {num_steps}')
  if chunk_steps < 1:
    raise ValueError(f'chunk_steps must be >= 1, got {chunk_steps}')
  if batching not in sweep.SEED_BATCHINGS:
    raise ValueError(f'batching must be one of {sweep.SEED_BATCHINGS}, got {batching!r}')
  num_seeds = jax.tree_util.tree_leaves(keys)[0].shape[0]
  if shared_args is not None:
    if not isinstance(shared_args, dict) or not isinstance(data_args, dict):
      raise ValueError('shared_args and data_args must be dicts (merged per seed), got '
                       f'{type(shared_args).__name__} and {type(data_args).__name__}')
    both = sorted(set(shared_args) & set(data_args))
    if both:
      raise ValueError(f'shared_args and data_args both hold {both}: give each key once')
  num_chunks = -(-num_steps // chunk_steps)
  history = np.full((num_seeds, num_chunks), np.nan, np.float32)
  start = int(np.asarray(sweep.to_host(state.step)).reshape(-1)[0])
  done = 0
  resumed_from = None
  if checkpointer is not None:
    restored = checkpointer.restore({'state': state, 'losses': history})
    if restored is not None:
      step, tree = restored
      resumed_from = step
      done = step - start
      if not 0 <= done <= num_steps or (done % chunk_steps and done != num_steps):
        raise ValueError(f'checkpoint at step {step} in {checkpointer.folder} does not belong '
                         f'to a run of {num_steps} steps in chunks of {chunk_steps} from '
                         f'step {start}')
      state, history = tree['state'], np.array(sweep.to_host(tree['losses']))

  def launch(st, length):  # dispatched asynchronously: returns before the chunk has run
    if shared_args is None:
      return _batched_chunk(loss_fn, optimizer, length, False, batching)(
          st, teacher_params, data_args, keys)
    return _batched_chunk(loss_fn, optimizer, length, True, batching)(
        st, teacher_params, data_args, keys, shared_args)

  t_start = time.perf_counter()
  first = done
  queued = None
  while done < num_steps:
    length = min(chunk_steps, num_steps - done)
    new_state, losses = queued if queued is not None else launch(state, length)
    finite = _chunk_finite(new_state.params, losses)
    queued = None
    if done + length < num_steps:
      # The next chunk is queued (after this one's check, before waiting for it), so the
      # devices keep working while the host waits for the check, saves the checkpoint and
      # logs (in the main job at rank 10, 18,000 steps took 7.6 s instead of 7.0 when the
      # devices idled meanwhile). If this chunk diverged, the queued one is dropped unread.
      queued = launch(new_state, min(chunk_steps, num_steps - done - length))
    ok = np.asarray(sweep.to_host(finite))
    if not ok.all():
      bad = np.flatnonzero(~ok).tolist()
      raise TrainingDivergedError(
          f'training diverged: non-finite loss or parameters for seeds {bad} in the '
          f'chunk after step {start + done}; the last good state (step {start + done}) '
          f'is kept', state, start + done, bad)
    state = new_state
    chunk_losses = np.asarray(sweep.to_host(losses))
    history[:, done // chunk_steps] = chunk_losses.mean(-1)
    done += length
    if checkpointer is not None:
      checkpointer.save(start + done, {'state': state, 'losses': history},
                        force=done == num_steps)
    if on_chunk is not None:
      elapsed = time.perf_counter() - t_start
      rate = (done - first) / max(elapsed, 1e-9)
      on_chunk({'step': done, 'num_steps': num_steps, 'steps_per_sec': rate,
                'eta_sec': (num_steps - done) / rate,
                'loss': float(chunk_losses[:, -1].mean()), 'resumed_from': resumed_from,
                'last_checkpoint': None if checkpointer is None else checkpointer.latest_step()})
  return state, history
