"""Stage 4: batch labelling into the database, resumably.

* :mod:`~pipeline.label.run` owns the run: :class:`LabelOptions` (every setting, one value),
  :class:`LabelRun` (the model, the selection's images not yet labelled, its ``label_runs``
  row, how it ended), :class:`BatchLabeller` (one batch's work, the same under every
  executor) and :class:`Local`, the executor on this machine: on a CPU, streams (processes
  with a copy of the model each) that do whole batches; on a GPU, one model whose loading,
  post-processing and writes overlap it (:class:`pipeline.distributed.Ray` is the other
  executor); :func:`label` opens a run and hands it to an executor.
* :mod:`~pipeline.label.batch`: the per-batch functions, pure of global state so a
  distributed engine's workers run them as they are: :func:`load_batch` (the cache's entries
  via :func:`pipeline.collect.fetch`, collected on the fly where missing; :func:`items_of`
  from entries fetched elsewhere) -> :func:`forward`
  (one pass of the model, films cut short labelled again from further out) ->
  :func:`postprocess` per image (masks in original geometry, measurements, quality, the
  input check) -> :func:`write_batch` (one transaction: masks, measurements, failures, the
  run's counts).

A re-run skips images the same model already measured, so after a crash (even ``kill -9``)
every image ends labelled exactly once. Nothing here imports the training code.
"""

from pipeline.label.batch import (  # noqa: F401
    REFRAME_CONTACTS,
    REFRAME_ZOOM,
    Item,
    LabelError,
    Result,
    edge_contacts,
    forward,
    forward_tta,
    items_of,
    load_batch,
    postprocess,
    postprocess_all,
    postprocess_or_fail,
    reframe,
    tta_scorer,
    write_batch,
)
from pipeline.label.run import (  # noqa: F401
    WRITES_IN_FLIGHT,
    BatchDone,
    BatchLabeller,
    LabelExecutor,
    LabelOptions,
    LabelRun,
    LabelSummary,
    Local,
    _alive,
    _prefetch,
    label,
    labelled_uids,
    mark_abandoned_runs,
    retire_other_versions,
    stream_shape,
)
