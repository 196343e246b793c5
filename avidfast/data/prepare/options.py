"""What ``avidfast prepare`` can be asked for: the output formats, the layout of OUT, the argument checks."""
from avidfast.data.probe import CHECKS
from avidfast.errors import AvidfastError

AUDIO_FORMATS = {"wav": ".wav", "flac": ".flac"}
TRANSCODES = {"h264": ".mp4", "vp9": ".webm"}
STATE_DIR = ".prepare"  # OUT/.prepare: the per-file records and the last run's options
OUTPUT_VERSION = 1  # bump when the outputs' format changes, so that reruns redo them


class PrepareError(AvidfastError, ValueError):
    """A mistake in the arguments or inputs of :func:`prepare` (one line, for the user)."""


def check_arguments(*, extract_audio, transcode, check, fps, gop, workers, min_seconds, short_side=None,
                    video_only=False) -> None:
    """Raises :class:`PrepareError` for an argument of :func:`avidfast.data.prepare.prepare` out of range."""
    if video_only and (extract_audio or transcode):
        raise PrepareError("video_only (--video-only) keeps files without sound for video-only evaluation and "
                           "writes nothing but the manifest; it cannot be combined with extract_audio "
                           "(--extract-audio) or transcode (--transcode)")
    if extract_audio not in (None, *AUDIO_FORMATS):
        raise PrepareError(f"extract_audio must be one of {sorted(AUDIO_FORMATS)} or None, got {extract_audio!r}")
    if transcode not in (None, *TRANSCODES):
        raise PrepareError(f"transcode must be one of {sorted(TRANSCODES)} or None, got {transcode!r}")
    if check not in CHECKS:
        raise PrepareError(f"check must be one of {', '.join(CHECKS)}, got {check!r}")
    if not isinstance(fps, int) or fps < 1 or fps > 240:
        raise PrepareError(f"fps must be an integer between 1 and 240, got {fps}")
    if not isinstance(gop, int) or gop < 1:
        raise PrepareError(f"gop must be a positive integer, got {gop}")
    if workers < 0:
        raise PrepareError(f"workers must be 0 (in this process) or more, got {workers}")
    if not min_seconds >= 0:
        raise PrepareError(f"min_seconds must be >= 0, got {min_seconds}")
    if short_side is not None:
        if not isinstance(short_side, int) or isinstance(short_side, bool) or short_side < 16:
            raise PrepareError(f"short_side must be an integer of at least 16 pixels, got {short_side!r}")
        if transcode is None:
            raise PrepareError("short_side scales the re-encoded copies: it needs transcode (h264 or vp9)")
