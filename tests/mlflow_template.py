"""A migrated, empty MLflow SQLite store made once per test session and copied where a test's stage would create a
new one. MLflow builds a new store by running every schema migration (≈2.4 s on this machine); the suite creates
dozens of fresh roots. A copy of the same empty store is what those migrations produce (and making the template
runs them, so store creation itself still runs once per session). A store is seeded only where MLflow was about to
create one; an existing store is never replaced."""

from __future__ import annotations

import os
import shutil

_TEMPLATE: dict[str, str] = {}


def make_template(folder: str) -> str:
    import mlflow

    path = os.path.join(folder, "mlflow-template.db")
    client = mlflow.MlflowClient(f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    _TEMPLATE["path"] = path
    return path


def seed(db_path: str) -> bool:
    """Copy the template to ``db_path`` when no store is there yet (and a template exists). True when copied."""
    template = _TEMPLATE.get("path")
    if not template or os.path.exists(db_path):
        return False
    os.makedirs(os.path.dirname(db_path) or ".", exist_ok=True)
    tmp = f"{db_path}.seeding-{os.getpid()}"
    shutil.copyfile(template, tmp)
    os.replace(tmp, db_path)
    return True


def sqlite_file(db_uri: str) -> str | None:
    """The file of a ``sqlite:///`` URI, None for any other store (or an in-memory one)."""
    prefix = "sqlite:///"
    if not str(db_uri).startswith(prefix):
        return None
    path = str(db_uri)[len(prefix):].split("?", 1)[0]
    return os.path.abspath(path) if path and path != ":memory:" else None


def install(monkeypatch) -> None:
    """Wrap both MLflow SQLAlchemy stores' constructors so a missing SQLite file is seeded from the template."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for cls in (TrackingStore, RegistryStore):
        original = cls.__init__

        def seeded_init(self, db_uri, *args, __original=original, **kwargs):
            path = sqlite_file(db_uri)
            if path is not None:
                seed(path)
            __original(self, db_uri, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", seeded_init)
