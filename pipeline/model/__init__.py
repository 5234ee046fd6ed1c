"""Models for inference: the spec, the network, checkpoints, prediction, devices, the registry.

Everything that runs a trained model imports this package, and only this one: labelling,
evaluation, benches and distributed workers never import the training code (the trainer
imports this, never the reverse).

* :mod:`~pipeline.model.spec`: :class:`ModelSpec`, what inference needs to rebuild and feed a
  network: the registered network and its arguments, the cache side and geometry mode, the
  training crop (sliding window when smaller than the image), the input normalisation, the
  film fix-ups it was trained with and the output structures; :func:`build_network`.
* :mod:`~pipeline.model.checkpoints`: a checkpoint (format ``cxrlabel-2``) is plain data, read
  with ``torch.load(weights_only=True)`` so that loading one never runs code::

      {"format": "cxrlabel-2", "spec": {...}, "state_dict": {name: tensor},
       "training": {the training configuration}, "info": {"dice": ..., "epoch": ..., ...}}

  Format ``cxrlabel-1`` (one ``config`` dict holding both) still loads; ``cxrlabel models
  upgrade`` rewrites such a file.
* :mod:`~pipeline.model.inference`: devices, :class:`LoadedModel`, the model's inputs,
  :func:`infer` and :func:`predict`, the batch size a device holds.
* :mod:`~pipeline.model.registry`: a model is named ``default`` (the shipped one), by its row in
  the ``models`` table, or by a checkpoint path (:func:`resolve_model`); its quality scores.
"""

from pipeline.model.checkpoints import (  # noqa: F401
    FORMAT,
    READABLE_FORMATS,
    Checkpoint,
    export_checkpoint,
    file_sha256,
    load_model,
    read_checkpoint,
    save_checkpoint,
    upgrade_checkpoint,
    write_checkpoint,
)
from pipeline.model.inference import (  # noqa: F401
    LoadedModel,
    auto_batch_size,
    infer,
    logits_of,
    model_inputs,
    pick_device,
    predict,
)
from pipeline.model.registry import (  # noqa: F401
    _finite,
    _shipped_row,
    default_model_path,
    list_models,
    locate,
    model_scores,
    model_spec,
    register_model,
    registered_path,
    resolve_model,
)
from pipeline.model.spec import (  # noqa: F401
    LabelledOutputs,
    ModelError,
    ModelSpec,
    PadToMultiple,
    build_network,
)
