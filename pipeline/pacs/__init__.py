"""A clinic's PACS: its films catalogued over DICOMweb (:mod:`~pipeline.pacs.catalogue`),
their pixels fetched on demand into the cache (:mod:`~pipeline.pacs.fetch`), results written
back (:mod:`~pipeline.pacs.results`), through one client (:mod:`~pipeline.pacs.client`)."""
