"""Fetches real media for the tests: Big Buck Bunny from MoviePy's sdist, cut into short clips.

Usage: python scripts/fetch_media.py [--clips N] [--seconds S] [--cache DIR]

Downloads ``moviepy==2.2.1`` as a source distribution with pip (skipped when it is already in the
cache), extracts ``resources/bbb.mp4`` (596 s, H.264 720p + AAC) from the documentation zip inside
it to ``CACHE/bbb.mp4``, and cuts N evenly spaced clips by stream copy into
``CACHE/bbb_clips_<N>x<S>s/`` with a ``manifest.csv``. The cache is ``$AVIDFAST_MEDIA_CACHE`` or
``~/.cache/avidfast/media``. The tests use these clips when present and skip otherwise.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import media  # noqa: E402  (tests/media.py)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--clips", type=int, default=3, help="number of clips to cut")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    parser.add_argument("--cache", help="cache folder (default: $AVIDFAST_MEDIA_CACHE or ~/.cache/avidfast/media)")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ["AVIDFAST_MEDIA_CACHE"] = os.path.abspath(args.cache)
    cache = media.media_cache()
    os.makedirs(cache, exist_ok=True)
    if not os.path.isfile(os.path.join(cache, "bbb.mp4")):
        sdist = media.fetch_sdist(cache, download=True)
        if sdist is None:
            print(f"could not download moviepy=={media.MOVIEPY_VERSION} into {cache} (offline?)", file=sys.stderr)
            return 1
        print(f"extracting Big Buck Bunny from {sdist}")
        media.extract_bbb(cache, sdist)
    manifest = media.real_clips(args.clips, args.seconds, download=False)
    if manifest is None:
        print("could not cut the clips", file=sys.stderr)
        return 1
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
