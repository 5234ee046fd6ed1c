"""Where a film comes from when it lives in a PACS: the DICOMweb client
(:mod:`~pipeline.pacs.client`: transport, paging, retries, credentials) and an instance
fetched beside the cache entry that needs it (:mod:`~pipeline.pacs.fetch`). It knows neither
the catalogue nor the cache: ``catalogue.dicomweb`` catalogues through it, ``collect`` fetches
through it, ``export.sr`` stores through it."""
