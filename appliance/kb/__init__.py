"""The vulnerability knowledge base: signed OSV bundles, version order, matching, the pipeline gate.

- :mod:`appliance.kb.bundle`: download (same origin, size-bounded), SHA-256 and Ed25519
  checks, atomic install keeping the old bundle on any failure; the installed version.
- :mod:`appliance.kb.match`: :class:`~appliance.kb.match.KnowledgeBase`, built once per
  bundle, indexed by (ecosystem, package), matching a host's packages to findings.
- :mod:`appliance.kb.versions`: dpkg, RPM and apk version order as sort keys.
- :mod:`appliance.kb.gate`: ``--fail-on-severity`` (exit 3) for build pipelines.
- :mod:`appliance.kb.errors`: the KbError family.
"""
