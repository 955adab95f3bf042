"""Receipts: what each enclave of a pipeline signs about a request it served, checkable
offline (:mod:`~smlaas.receipts.digests`, :mod:`~smlaas.receipts.cose`,
:mod:`~smlaas.receipts.claims`, :mod:`~smlaas.receipts.evidence`,
:mod:`~smlaas.receipts.verify`)."""
