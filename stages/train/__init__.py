"""Training stages on Ray Train.

Shared machinery (this package): ``trainer.run_training(cfg, ctx)`` — the TorchTrainer every training stage runs —,
``loop.train_loop`` (per worker), ``strategies`` (DDP / FSDP2 / DeepSpeed ZeRO), ``checkpointing`` (sharded
checkpoints, resume with fallback, final diffusers export), ``ema``, ``schedules``, ``plan`` (dry-run memory plan),
``worker_logging`` (MLflow from rank 0) and ``sample_grid``. What is trained comes from ``tasks.make_task`` and the
batches from ``data_loader.make_batch_iterator``.
"""
