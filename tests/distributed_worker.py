"""Worker for tests/test_distributed.py: fits on the images of a folder in this process, or as
one process of a multi-process run (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` in the environment), and saves the prototypes of each setting to an .npz;
then scores lists of those images and the unreadable file BAD (``score_images(...,
across_processes=True)``, one image per device per batch) and saves every output of each list.

  python tests/distributed_worker.py WEIGHTS.npz IMAGE_DIR BAD OUT.npz
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np


def main(weights_npz: str, image_dir: str, bad: str, out: str) -> None:
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
        tiles = dataclasses.replace(model, config=dataclasses.replace(
            model.config, view="tiles", tile_size=64, tile_overlap=32))
        lists = {  # blocks of 3 + 3 with a skip; a process without images; an unreadable block
            "mixed": (model, [*images[:2], bad, *images[2:5]]),
            "tiles": (tiles, [*images[:2], bad, *images[2:5]]),
            "one_image": (model, images[:1]),
            "unreadable_block": (model, [bad, bad, *images[:2]]),
        }
        for name, (m, paths) in lists.items():
            scored = pipeline.score_images(m, paths, variables, batch_size=jax.local_device_count(),
                                           progress=False, skip_bad=True, across_processes=True)
            res.update({f"{name}/maps": scored.maps, f"{name}/scores": scored.scores,
                        f"{name}/inputs": np.array([str(p) for p in scored.inputs]),
                        f"{name}/skipped": np.array([f"{s.path}: {s.reason}" for s in scored.skipped])})
            if scored.patch_maps is not None:
                res[f"{name}/patch_maps"] = scored.patch_maps
            for i, frame in enumerate(scored.frames or []):
                res[f"{name}/frame_{i}"] = frame
        if distributed.is_main():
            np.savez(out, **res, devices=np.array([jax.device_count(), jax.process_count()]))
        distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
