r"""Speed of the robust-feature matching (the longest stage of the default MNIST run) by batch size.

Runs ``tsrobust.robust_dataset.robust_feature_dataset`` as ``experiments/real.py`` does
(one jitted call per batch, with a progress callback), with the real binary's robust
model (``experiments/configs/real.py``'s teacher CNN, as ``benchmarks/setting.py``'s
``ImageJob`` declares it; random weights: the cost does not depend on them) on the
bundled MNIST training images, ``--steps`` normalized L2 steps, for each batch size of
``--batch_sizes``, once with every batch on one device and once spread over all devices
(``mesh=sweep.seed_mesh()``; on a CPU one device per core). Prints us per image and
step, timed from the end of the first batch (which compiles: ``robust_feature_dataset``
jits its batch function per call) to the end of the last, median of ``--repeats`` runs,
and the maximum difference between the two layouts' matches.

    python -m benchmarks.rf_matching [--batch_sizes=64,128,256,1024] [--steps=50]
"""

import argparse
import statistics
import time

from benchmarks import hardware


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_sizes', default='64,128,256,1024')
  parser.add_argument('--num_images', type=int, default=2048)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--cpu_devices', type=int, default=0, help='0: one per core')
  args = parser.parse_args()
  from tsrobust import sweep  # pylint: disable=g-import-not-at-top
  sweep.use_all_cpu_cores(args.cpu_devices or None)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import setting  # pylint: disable=g-import-not-at-top
  from tsrobust import cnn  # pylint: disable=g-import-not-at-top
  from tsrobust import robust_dataset  # pylint: disable=g-import-not-at-top
  print(hardware.environment())
  meter = hardware.OtherLoad()

  config = setting.ImageJob()  # the image binary's default config
  dataset = config.load_data()
  model = config.teacher_model(dataset.num_classes)
  params = cnn.init_params(jax.random.PRNGKey(0), model, dataset.train_x.shape[1:])
  rep = robust_dataset.penultimate(model.apply, params)
  x = jnp.asarray(dataset.train_x[:args.num_images])
  mesh = sweep.seed_mesh()

  def run(batch_size, layout):
    """``(matches, us per image and step after the first batch)``."""
    reports = []

    def on_batch(report):
      reports.append((time.perf_counter(), report['step']))
    x_r, _ = robust_dataset.robust_feature_dataset(
        rep, x, jax.random.PRNGKey(1), steps=args.steps, step_size=config.rf_step_size,
        batch_size=batch_size, on_batch=on_batch, mesh=layout)
    if len(reports) < 2:
      raise ValueError(f'--num_images must hold at least 2 batches of {batch_size}')
    (t0, done0), (t1, done1) = reports[0], reports[-1]
    return np.asarray(x_r), 1e6 * (t1 - t0) / ((done1 - done0) * args.steps)

  print(f'\n{x.shape[0]} images x {args.steps} steps, robust model conv {model.conv_widths} '
        f'dense {model.dense_widths}; {jax.device_count()} devices; medians of {args.repeats}\n')
  print('| batch | one device (us / image-step) | over the mesh (us / image-step) | ratio | '
        'max abs difference |\n|---|---|---|---|---|', flush=True)
  for b in [int(v) for v in args.batch_sizes.split(',')]:
    us, outs = [], []
    for layout in (None, mesh):
      runs = [run(b, layout) for _ in range(args.repeats)]
      outs.append(runs[0][0])
      us.append(statistics.median(r[1] for r in runs))
    print(f'| {b} | {us[0]:.1f} | {us[1]:.1f} | {us[0] / us[1]:.2f}x | '
          f'{np.abs(outs[0] - outs[1]).max():.1e} |', flush=True)
  print(f'\nother processes {meter.cores():.2f} cores')


if __name__ == '__main__':
  main()
