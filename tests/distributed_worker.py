"""Worker for tests/test_distributed.py: fits on the images of a folder in this process, or as
one process of a multi-process run (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` in the environment), and saves the prototypes of each setting to an .npz.

  python tests/distributed_worker.py WEIGHTS.npz IMAGE_DIR OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np


def main(weights_npz: str, image_dir: str, out: str) -> None:
    from protoad_jax import distributed

    distributed.initialize()
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    jax.config.update("jax_default_matmul_precision", "highest")
    from protoad_jax import Config, datasets, pipeline, weights

    variables = weights.load_backbone(weights_npz, "wide_resnet50_2")
    images = datasets.find_images(image_dir)
    settings = {  # every patch (FINCH's factored level 0), a seeded sample, k-means, a coreset
        "finch_all": Config(resize=64, image_size=64, num_prototypes=12, max_patches=None),
        "finch_sample": Config(resize=64, image_size=64, num_prototypes=12, max_patches=700),
        "kmeans_sample": Config(resize=64, image_size=64, clustering="kmeans", num_prototypes=12,
                                max_patches=700),
        "coreset": Config(resize=64, image_size=64, num_prototypes=12, max_patches=300,
                          patch_sampler="coreset"),
    }
    res = {}
    with distributed.failures_as_errors():
        for name, config in settings.items():
            model = pipeline.fit(images, config=config, variables=variables, batch_size=2,
                                 progress=False, across_processes=True)
            res[name] = model.prototypes
        if distributed.is_main():
            np.savez(out, **res, devices=np.array([jax.device_count(), jax.process_count()]))
        distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
