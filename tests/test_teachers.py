"""Pretrained teachers (tsrobust.teachers): specs, the cache's folders, the supervised loss."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tsrobust import attacks
from tsrobust import cnn
from tsrobust import datasets
from tsrobust import teachers


def _fields(**overrides):
  f = dict(seed=0, dataset='mnist', data_dir='', num_train=64, lowrank_rank=0,
           teacher_conv=(2,), teacher_dense=(4,), kernel_size=3, pool='max', use_bias=True,
           teacher_training='standard', teacher_eps=0.1, teacher_steps=3, teacher_batch=8,
           teacher_lr=0.003, teacher_pgd_steps=1, eps_denominator=1.0, rf_model_eps=0.2,
           rf_model_steps=5)
  f.update(overrides)
  return ml_collections.ConfigDict(f)


def _toy_dataset():
  """16 training / 4 test random 6 x 6 images with labels in 0..9."""
  rng = np.random.default_rng(0)
  return datasets.Dataset(rng.uniform(size=(16, 6, 6, 1)).astype(np.float32),
                          rng.integers(0, 10, 16).astype(np.int32),
                          rng.uniform(size=(4, 6, 6, 1)).astype(np.float32),
                          rng.integers(0, 10, 4).astype(np.int32), 'toy')


def test_config_hash_known_answer():
  # SHA-256 of the sorted JSON '{"a": 1, "b": [1, 2]}', first 16 hex digits.
  assert teachers.config_hash({'b': (1, 2), 'a': 1}) == 'e6f20bdc3757e5e7'
  assert teachers.config_hash({'a': 1, 'b': [1, 2]}) == teachers.config_hash({'b': [1, 2],
                                                                             'a': 1})


def test_spec_fields_and_roles(tmp_path):
  spec = teachers.teacher_spec(_fields(data_dir='rel/dir'))
  assert set(spec) == set(teachers.TEACHER_FIELDS) | {'format'}
  assert spec['data_dir'] == os.path.abspath('rel/dir')
  assert spec['teacher_eps'] == 0.0  # unused by a standard teacher: does not key it
  assert spec['teacher_conv'] == [2] and spec['format'] == teachers.TEACHER_FORMAT
  # The robust model fine-tuned from the teacher (rf_model_init = teacher) ...
  robust = teachers.teacher_spec(_fields(rf_model_init='teacher'), 'robust_model')
  assert robust['teacher_training'] == 'pgd' and robust['teacher_eps'] == 0.2
  assert robust['teacher_steps'] == 5 and robust['init_from'] == teachers.config_hash(
      teachers.teacher_spec(_fields()))
  assert 'stream' not in robust
  pgd = _fields(teacher_training='pgd', rf_model_init='teacher')
  assert teachers.teacher_spec(pgd, 'robust_model') == teachers.teacher_spec(pgd)
  # ... or trained from scratch on its own stream (the default, also without the field),
  # for a standard and for a PGD-trained teacher alike: never the teacher's spec.
  for fields in (_fields(), _fields(rf_model_init='scratch'),
                 _fields(teacher_training='pgd', rf_model_init='scratch')):
    scratch = teachers.teacher_spec(fields, 'robust_model')
    assert scratch['stream'] == 'robust_model' and 'init_from' not in scratch
    assert scratch['teacher_training'] == 'pgd' and scratch['teacher_eps'] == 0.2
    assert scratch['teacher_steps'] == 5 and scratch['seed'] == 0
    assert scratch != teachers.teacher_spec(fields)
  with pytest.raises(ValueError, match='rf_model_init must be one of'):
    teachers.teacher_spec(_fields(rf_model_init='fine_tune'), 'robust_model')
  with pytest.raises(ValueError, match='role must be'):
    teachers.teacher_spec(_fields(), 'student')
  root = teachers.teachers_root('', str(tmp_path))
  assert root == os.path.join(str(tmp_path), 'teachers')
  assert teachers.teachers_root('shared', str(tmp_path)) == os.path.abspath('shared')
  assert teachers.teacher_folder(root, spec) == os.path.join(root, teachers.config_hash(spec))


def test_supervised_loss_known_answers():
  model = cnn.make_cnn((2,), (4,), 3)
  params = cnn.init_params(jax.random.PRNGKey(0), model, (6, 6, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6, 6, 1))
  y = jnp.arange(8) % 3
  args = {'train_x': x, 'train_y': y, 'at_eps': jnp.float32(0.2)}
  key = jax.random.PRNGKey(2)
  # Clean: the cross-entropy on the batch drawn with the first half of the key.
  idx = jax.random.randint(jax.random.split(key)[0], (4,), 0, 8)
  want = attacks.cross_entropy(model.apply(params, x[idx])[0], y[idx]).mean()
  clean = teachers.supervised_loss(model.apply, 8, 4, pgd_steps=0)(params, None, args, key)
  np.testing.assert_allclose(clean, want, rtol=1e-6)
  # PGD-AT at budget 0 is the clean loss; at a budget the attack raises it.
  zero = dict(args, at_eps=jnp.float32(0.0))
  adv = teachers.supervised_loss(model.apply, 8, 4, pgd_steps=3)
  np.testing.assert_allclose(adv(params, None, zero, key), want, rtol=1e-5)
  assert float(adv(params, None, args, key)) > float(want)


def test_supervised_loss_budget_warmup():
  # eps_warmup = W: at step t the PGD-AT budget is at_eps * min(1, (t + 1) / W), i.e. the loss
  # equals the un-warmed loss at that budget, and the full budget from step W - 1 on.
  model = cnn.make_cnn((2,), (4,), 3)
  params = cnn.init_params(jax.random.PRNGKey(0), model, (6, 6, 1))
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6, 6, 1))
  args = {'train_x': x, 'train_y': jnp.arange(8) % 3, 'at_eps': jnp.float32(0.2)}
  key = jax.random.PRNGKey(2)
  plain = teachers.supervised_loss(model.apply, 8, 4, pgd_steps=3)
  warm = teachers.supervised_loss(model.apply, 8, 4, pgd_steps=3, eps_warmup=4)
  assert getattr(warm, 'reads_step', False) and not getattr(plain, 'reads_step', False)
  for t, frac in ((0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)):
    at = dict(args, at_eps=jnp.float32(0.2 * frac))
    np.testing.assert_allclose(warm(params, None, args, key, jnp.int32(t)),
                               plain(params, None, at, key), rtol=1e-5)
  first, full = warm(params, None, args, key, jnp.int32(0)), plain(params, None, args, key)
  assert float(first) < float(full)
  # Standard training (no attack) has nothing to warm up: the plain loss.
  assert not getattr(teachers.supervised_loss(model.apply, 8, 4, pgd_steps=0, eps_warmup=4),
                     'reads_step', False)
  with pytest.raises(ValueError, match='eps_warmup'):
    teachers.supervised_loss(model.apply, 8, 4, pgd_steps=3, eps_warmup=-1)


def test_warmup_keys_pgd_training_only_when_on():
  # pgd_warmup = f: eps_warmup = round(f * steps) in the spec of every PGD-AT (robust model,
  # PGD teacher); off (0, absent, or rounding to 0 steps) the spec, hence the cached model's
  # folder, is the one without the field.
  base = teachers.teacher_spec(_fields(), 'robust_model')
  assert 'eps_warmup' not in base
  assert teachers.teacher_spec(_fields(pgd_warmup=0.0), 'robust_model') == base
  assert teachers.teacher_spec(_fields(pgd_warmup=0.05), 'robust_model') == base  # 0.25 steps
  assert teachers.teacher_spec(_fields(pgd_warmup=0.4), 'robust_model') == dict(base,
                                                                                eps_warmup=2)
  # A standard teacher has no PGD-AT to warm up; a PGD teacher's spec gets its own.
  assert teachers.teacher_spec(_fields(pgd_warmup=0.4)) == teachers.teacher_spec(_fields())
  pgd = teachers.teacher_spec(_fields(teacher_training='pgd', pgd_warmup=0.4))
  assert pgd == dict(teachers.teacher_spec(_fields(teacher_training='pgd')), eps_warmup=1)
  # Fine-tuning a standard teacher: warmed up, and init_from is the teacher's hash as before.
  tuned = teachers.teacher_spec(_fields(rf_model_init='teacher', pgd_warmup=0.4), 'robust_model')
  assert tuned['eps_warmup'] == 2
  assert tuned['init_from'] == teachers.config_hash(teachers.teacher_spec(_fields()))
  with pytest.raises(ValueError, match='pgd_warmup'):
    teachers.teacher_spec(_fields(pgd_warmup=1.5))


def test_pretrain_reuses_its_checkpoint(tmp_path):
  ds = _toy_dataset()
  model = cnn.make_cnn((2,), (4,), 10)
  spec = teachers.teacher_spec(_fields(num_train=16))
  reports = []
  p1, info1 = teachers.pretrain_teacher(spec, model, ds, str(tmp_path), on_chunk=reports.append)
  assert not info1['reused'] and reports[-1]['step'] == 3
  with open(os.path.join(info1['folder'], 'spec.json')) as f:
    assert json.load(f) == json.loads(json.dumps(spec))
  p2, info2 = teachers.pretrain_teacher(spec, model, ds, str(tmp_path))
  assert info2['reused'] and info2['final_loss'] == info1['final_loss']
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_robust_model_from_scratch_has_its_own_stream(tmp_path):
  # The same fields as a PGD teacher, but the robust model's stream: another initialization
  # (fold_in(fold_in(PRNGKey(seed), TRAIN_KEY), 1)), so other parameters after training.
  ds = _toy_dataset()
  model = cnn.make_cnn((2,), (4,), 10)
  fields = _fields(num_train=16, teacher_training='pgd', teacher_eps=0.2, teacher_steps=5)
  t_spec, r_spec = teachers.teacher_spec(fields), teachers.teacher_spec(fields, 'robust_model')
  assert {k: v for k, v in r_spec.items() if k != 'stream'} == t_spec
  root = str(tmp_path)
  t_params, t_info = teachers.pretrain_teacher(t_spec, model, ds, root)
  r_params, r_info = teachers.pretrain_teacher(r_spec, model, ds, root, 'robust_model')
  assert r_info['folder'] != t_info['folder']
  pairs = zip(jax.tree_util.tree_leaves(t_params), jax.tree_util.tree_leaves(r_params))
  assert not any(np.array_equal(a, b) for a, b in pairs)
  # Zero steps of training leave the initialization: the stream's key, not the teacher's.
  key = jax.random.fold_in(jax.random.PRNGKey(0), teachers.TRAIN_KEY)
  r0, _ = teachers.pretrain_teacher(dict(r_spec, teacher_steps=0), model, ds, root)
  want = cnn.init_params(jax.random.split(jax.random.fold_in(key, 1))[0], model, (6, 6, 1))
  for a, b in zip(jax.tree_util.tree_leaves(r0), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, np.asarray(b))
