"""The survey's metrics on the offline evaluator, paired fidelity, and costs (docs/metrics.md).

  from dqjax import metrics
  metrics.evaluate_samples(images, labels)   # fid, sfid, is, precision, recall, cond_acc
  metrics.psnr(q_images, fp_images); metrics.ssim(...); metrics.trajectory_mse(q_traj, fp_traj)

Feature networks: `dqjax.metrics.evaluator` (the shipped MNIST classifier) and
`dqjax.metrics.inception` (the FID Inception-v3, for users with the standard weights on disk).
"""
from dqjax.metrics.cost import OpCost, bops, macs_of_conv, macs_of_dense, model_size_mb  # noqa: F401
from dqjax.metrics.fid import (conditional_accuracy, fid, frechet_distance,  # noqa: F401
                               frechet_distance_to_reference, inception_score, manifold_radii, precision_recall,
                               sfid, statistics)
from dqjax.metrics.paired import psnr, ssim, ssim_map, trajectory_mse  # noqa: F401
from dqjax.metrics.suite import evaluate_samples  # noqa: F401
