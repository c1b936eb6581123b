"""Training core: task recipes, LoRA settings, update policies, the trainer, scoring and metrics.

Catalog-independent: everything here works on in-memory models, examples and PEFT folders; the
manager decides what to train on and registers what comes out.

Heads (ranker only; the retriever has none):
- every ranker adapter saves its own trained classification head (peft ``modules_to_save``);
- ``fresh``: the head is drawn from ``seed`` (not copied from the base's per-process random head);
  ``warm_start``: copied from the parent; ``stack``: starts from the newest parent's head;
- ``weights`` mode (stack / long_short): deltas summed, the NEWEST adapter's head is used;
- ``ensemble`` mode: each adapter runs with its own head, P(like) averaged with weights;
- merges must take the newest source's head, so a ``cat`` merge equals the ``weights`` stack.

Nothing is re-exported here: importing a light submodule (``lora.base_model``, ``lora.settings``)
must not import torch, so that catalog-only commands start fast. Import from the submodules::

    from adapters_mgr.lora.trainer import train_adapter

    result = train_adapter(base, tokenizer, "ranker", rows, policy="stack", parents=[(folder, 1.0)])
    result.save(tmp_dir)          # only the new adapter; the manager registers it
    result.release()              # detach peft layers before the next training on this base
"""
