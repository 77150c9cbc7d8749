"""Writers that fill a disk without saying so in an OSError: torch.save's short write (a
RuntimeError "unexpected pos 179712 vs 179604") and safetensors' SafetensorError ("... No space
left on device (os error 28)"). `disk_full_error` names them as the OSError a command line
reports in one line (`experiments.cli_errors.is_storage_error`: `error: cannot write ...`)
instead of a traceback:

    try:
        torch.save(payload, tmp)
    except Exception as err:
        full = disk_full_error(err, path)
        if full is not None:
            raise full from err
        raise

Tests: `.venv/bin/python -m pytest tests/test_model_folder.py -k disk`.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

# the Rust io::Error text of a storage errno (safetensors): "(os error 28)"
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")
# OSError numbers that say the output place cannot take the file, not that the program is wrong
# (a permission error is not one: it may be a file the command reads); `experiments.cli_errors` reads them too
STORAGE_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_SHORT_WRITE = "unexpected pos"  # torch.save's zip writer after a short write


def disk_full_error(err: BaseException, target: str | os.PathLike[str]) -> OSError | None:
    """An OSError of the storage errno a writer's non-OSError error stands for (ENOSPC for
    torch's short write; 28 / 122 / 30 as safetensors quotes them), naming target; None for an
    OSError (already one) and for any other error."""
    if isinstance(err, OSError) or not isinstance(err, Exception):
        return None
    text = " ".join(str(err).split())
    quoted = _OS_ERROR_RE.search(text)
    code = int(quoted.group(1)) if quoted else errno.ENOSPC if _SHORT_WRITE in text else None
    if code not in STORAGE_ERRNOS:
        return None
    return OSError(code, f"{os.strerror(code)} ({type(err).__name__}: {text[:200]})", str(Path(target)))
