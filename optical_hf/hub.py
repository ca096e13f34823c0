"""Publish a trained OPTICAL student folder to the Hugging Face Hub.

The full push uploads the sentence-transformers folder as is (LoRA, if any, is already merged into
``model.safetensors``), without ``adapter/``, training checkpoints and other training leftovers. The adapter-only push
uploads the peft adapter (``adapter/adapter_config.json`` + ``adapter/adapter_model.safetensors``, moved to the repo
root, with ``base_model_name_or_path`` set to a Hub id) and the sentence-transformers module files, but not the
transformer weights. Both re-render the README with the repo id in its usage snippet and delete the files an earlier
push left in the repo that this one does not upload. Rewritten files are sent from memory: the local folder is never
modified, so a failed upload can simply be retried.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import shlex
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, HFValidationError, filter_repo_objects, validate_repo_id


try:  # huggingface_hub >= 2 talks HTTP through httpx2, 1.x through httpx; transport errors subclass neither OSError
    from httpx2 import HTTPError as _HttpClientError
except ImportError:
    from httpx import HTTPError as _HttpClientError

from sentence_transformers import SentenceTransformer

from .export import ADAPTER_DIR, STUDENT_MARKER
from .model_card import (
    CARD_INFO_NAME, MODEL_CARD_NAME, StudentCardInfo, is_hub_repo_id, read_json, render_model_card,
)


logger = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# Training leftovers that never belong in a published model (patterns as in `huggingface_hub.utils.filter_repo_objects`;
# a trailing "/" means the whole folder).
JUNK_PATTERNS = [
    *DEFAULT_IGNORE_PATTERNS,
    "checkpoint-*/",
    "*/checkpoint-*/",
    "runs/",
    "eval/",
    "__pycache__/",
    "*/__pycache__/",
    ".ipynb_checkpoints/",
    "*.pyc",
    ".DS_Store",
    "*/.DS_Store",
    "*.log",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
]
# Root-level transformer weights and config, replaced by the adapter + the base model in an adapter-only push.
# Files a sentence-transformers folder needs to load (configs, weights, tokenizer), in fnmatch syntax.
# fnmatch's "*" also matches "/", so "*.json" covers the module folders' configs (1_Pooling/config.json ...).
LOAD_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "vocab*", "merges.txt", "tokenizer*"]
FULL_MODEL_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
]

_HUB_ERRORS = (HfHubHTTPError, OSError, _HttpClientError)


class HubPushError(RuntimeError):
    """An upload to the Hub failed; the local folder is intact and ``retry_command`` repeats the push."""

    def __init__(self, message: str, *, folder: Path, repo_id: str, retry_command: str) -> None:
        super().__init__(message)
        self.folder = folder
        self.repo_id = repo_id
        self.retry_command = retry_command


def push_student(
    folder: str | Path,
    repo_id: str,
    *,
    adapter_only: bool = False,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload a trained student folder to the Hub model repo ``repo_id`` (created if needed); return the commit URL.

    Args:
        folder: student folder written by training (sentence-transformers files + ``optical_hf.json``).
        repo_id: ``namespace/name`` of the Hub model repo; a bare ``name`` goes to the token's user namespace (as
            ``HfApi.create_repo`` does).
        adapter_only: upload the LoRA adapter from ``folder/adapter`` instead of the merged weights.
        base_model: Hub id the student was initialised from; overrides ``optical_hf.json``'s ``base_model``.
            Required (here or in ``optical_hf.json``) with ``adapter_only``; never a local path.
        private: visibility of a newly created repo (ignored when the repo exists).
        token: Hub token; defaults to the locally saved one.
        endpoint: Hub URL; defaults to ``HF_ENDPOINT`` / https://huggingface.co.
        commit_message: defaults to "Upload OPTICAL <language> student".
        revision: branch to commit to (created from ``main`` if missing); defaults to ``main``.

    Files of an earlier push that this push does not upload are deleted from the revision in the same commit (the
    repo mirrors the student folder; ``.gitattributes`` is kept).

    Raises:
        ValueError: bad ``repo_id``/``base_model``, or ``folder`` is not a student folder, or a file it needs to load
            is missing or a symlink to outside the folder (checked before anything is sent).
        HubPushError: the Hub or the network failed; the message says how to retry.
    """
    folder = Path(folder).expanduser().resolve()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repo id of the form 'namespace/name': {err}") from err
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: nothing to push (train a student first).")
    if not (folder / "modules.json").is_file():
        raise ValueError(f"{folder} is not a sentence-transformers folder: {folder / 'modules.json'} is missing.")
    info = StudentCardInfo.load(folder)
    hub_base_model = base_model if base_model is not None else info.base_model
    if hub_base_model is not None and not is_hub_repo_id(hub_base_model):
        raise ValueError(
            f"base_model={hub_base_model!r} is a local path or not a Hub id: pass the Hub id the student was "
            "initialised from (e.g. 'FacebookAI/xlm-roberta-base')."
        )
    if adapter_only and hub_base_model is None:
        raise ValueError(
            f"An adapter-only push needs base_model, the Hub id the adapter in {folder / ADAPTER_DIR} applies to; "
            f"{folder / CARD_INFO_NAME} has none."
        )
    files = _files_to_upload(folder, adapter_only=adapter_only)  # refuses a folder that would not load, before the Hub
    retry_command = _retry_command(
        folder, repo_id, adapter_only=adapter_only, base_model=base_model, private=private, revision=revision,
        endpoint=endpoint,
    )
    api = HfApi(endpoint=endpoint, token=token, library_name="optical-hf")
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    except (*_HUB_ERRORS, ValueError) as err:
        raise _push_error(err, folder, repo_id, api.endpoint, retry_command) from err
    info = dataclasses.replace(info, model_id=repo_id, base_model=hub_base_model)
    operations = _operations(folder, info, files, adapter_only=adapter_only)  # the card needs the repo id the Hub gave
    try:
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        operations.extend(_stale_file_deletions(api, repo_id, revision, operations))
        logger.info(
            "Pushing %s to %s/%s%s: %s", folder, api.endpoint, repo_id, " (adapter only)" if adapter_only else "",
            ", ".join(f"{type(op).__name__[len('CommitOperation'):].lower()} {op.path_in_repo}" for op in operations),
        )
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or _commit_message(info, adapter_only),
            repo_type="model",
            revision=revision,
        )
    except (*_HUB_ERRORS, ValueError) as err:
        raise _push_error(err, folder, repo_id, api.endpoint, retry_command) from err
    logger.info("Pushed %s: %s", repo_id, commit.commit_url)
    return commit.commit_url


def _operations(
    folder: Path, info: StudentCardInfo, files: list[str], *, adapter_only: bool
) -> list[CommitOperationAdd]:
    """The files of the push: ``files`` (:func:`_files_to_upload`), the card re-rendered for ``info.model_id`` and
    the card info."""
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    card = render_model_card(info, model, adapter_only=adapter_only)
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
        for path in files
    ]
    operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    operations.append(CommitOperationAdd(path_in_repo=CARD_INFO_NAME, path_or_fileobj=info.to_json().encode("utf-8")))
    if adapter_only:
        operations.extend(_adapter_operations(folder, info.base_model))
    return operations


def _push_error(err: Exception, folder: Path, repo_id: str, endpoint: str, retry_command: str) -> HubPushError:
    """The :class:`HubPushError` of a failed Hub call, with a hint and the command that retries the push."""
    return HubPushError(
        f"Pushing {folder} to the Hub repo {repo_id} ({endpoint}) failed: {type(err).__name__}: {err}\n"
        f"{_hint(err, folder, repo_id)}"
        f"The local folder {folder} is intact (the push never modifies it). Retry with:\n  {retry_command}",
        folder=folder,
        repo_id=repo_id,
        retry_command=retry_command,
    )


def _commit_message(info: StudentCardInfo, adapter_only: bool) -> str:
    language = f" {', '.join(info.languages)}" if info.languages else ""
    return f"Upload OPTICAL{language} student{' (LoRA adapter)' if adapter_only else ''}"


def _stale_file_deletions(
    api: HfApi, repo_id: str, revision: str | None, uploads: list[CommitOperationAdd]
) -> list[CommitOperationDelete]:
    """Deletions of the files an earlier push left in the repo that this push does not upload (as
    ``upload_folder(delete_patterns="*")`` does; ``.gitattributes`` is kept): the repo mirrors the student, so e.g. an
    adapter-only push after a full one leaves no merged weights beside the adapter."""
    uploaded = {op.path_in_repo for op in uploads}
    remote = api.list_repo_files(repo_id, revision=revision, repo_type="model")
    return [
        CommitOperationDelete(path_in_repo=path)
        for path in remote
        if path not in uploaded and path != ".gitattributes"
    ]


def _files_to_upload(folder: Path, *, adapter_only: bool) -> list[str]:
    """Relative POSIX paths of the files of ``folder`` uploaded as they are (README and card info are re-rendered).

    A symlink that points outside ``folder`` is skipped with a warning (its target is not part of the student), unless
    the model needs it to load (:data:`LOAD_PATTERNS`): then, as when the config or the weights of a full push are
    missing, the push is refused with a ``ValueError`` naming the file, since the repo would not load.
    """
    ignore = [*JUNK_PATTERNS, f"{ADAPTER_DIR}/", STUDENT_MARKER, MODEL_CARD_NAME, CARD_INFO_NAME]
    if adapter_only:
        ignore.extend(FULL_MODEL_PATTERNS)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    uploads = []
    for path in filter_repo_objects(paths, ignore_patterns=ignore):
        target = (folder / path).resolve()
        if target.is_relative_to(folder):
            uploads.append(path)
        elif any(fnmatch.fnmatchcase(path, pattern) for pattern in LOAD_PATTERNS):
            raise ValueError(f"{folder / path} is a symlink to {target}, outside {folder}: the pushed repo would lack "
                             "it and not load; copy the file into the folder instead of linking it")
        else:
            logger.warning("Not uploading %s: it is a symlink to %s, outside %s", folder / path, target, folder)
    if not adapter_only:
        # a pair folder (sentence-transformers' Router) keeps each side's transformer in its own subfolder
        roots = sorted({path.split("/")[0] + "/" for path in paths if path.split("/")[0].endswith("_Transformer")
                        and "/" in path}) or [""]
        for root in roots:
            for needed in ("config.json", "model.safetensors|pytorch_model.bin|model.safetensors.index.json"):
                if not any(root + name in uploads for name in needed.split("|")):
                    raise ValueError(f"{folder / (root + needed.split('|')[0])} is missing: the pushed repo would not "
                                     "load (save the student again with optical_hf.save_student)")
    return uploads


def _adapter_operations(folder: Path, base_model: str) -> list[CommitOperationAdd]:
    """The peft adapter files, moved to the repo root, with ``base_model_name_or_path`` set to the Hub id."""
    config_path = folder / ADAPTER_DIR / ADAPTER_CONFIG_NAME
    weights_path = folder / ADAPTER_DIR / ADAPTER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ValueError(
                f"An adapter-only push needs {path}, which is missing: the student was trained without LoRA "
                "(push the full model instead)."
            )
    adapter_config = read_json(config_path)
    adapter_config["base_model_name_or_path"] = base_model
    return [
        CommitOperationAdd(
            path_in_repo=ADAPTER_CONFIG_NAME,
            path_or_fileobj=(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        ),
        CommitOperationAdd(path_in_repo=ADAPTER_WEIGHTS_NAME, path_or_fileobj=str(weights_path)),
    ]


def _retry_command(
    folder: Path, repo_id: str, *, adapter_only: bool, base_model: str | None, private: bool | None,
    revision: str | None, endpoint: str | None = None,
) -> str:
    """The ``optical-hf push`` command line that repeats this push (keeping ``--private``: a retry after a failed
    ``create_repo`` must not create a public repo)."""
    args = ["optical-hf", "push", str(folder), "--repo_id", repo_id]
    if adapter_only:
        args.append("--adapter_only")
    if private:
        args.append("--private")
    if base_model is not None:
        args.extend(["--base_model", base_model])
    if revision is not None:
        args.extend(["--revision", revision])
    if endpoint is not None:
        args.extend(["--endpoint", endpoint])
    return shlex.join(args)


def _hint(err: Exception, folder: Path, repo_id: str) -> str:
    """A line on how to fix the common causes of a failed push, or an empty string."""
    if isinstance(err, ValueError):  # raised by HfApi when the Hub rejects the README metadata
        return f"The Hub rejected the model card metadata: fix {folder / CARD_INFO_NAME}, then retry.\n"
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to reach the Hub.\n"
    response = getattr(err, "response", None)
    if isinstance(err, HfHubHTTPError) and response is not None and response.status_code in (401, 403):
        namespace = repo_id.split("/", 1)[0]
        return f"Check that your token (`hf auth login` or token=...) has write access to '{namespace}'.\n"
    return ""
