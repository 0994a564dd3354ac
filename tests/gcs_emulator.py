"""gcp-storage-emulator for tests/test_storage.py, plus the object generation header tensorstore's GCS driver reads
(`x-goog-generation` on downloads; without it the second checkpoint's reads fail as "Malformed StorageGeneration").

  python tests/gcs_emulator.py start --host 127.0.0.1 --port P --default-bucket B --in-memory -q
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (not found: the handler already answered 404)
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj["metageneration"]


objects.download = download  # Before the server module builds its routes from it.

from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  sys.exit(main())
