"""Use cases: the controller's business rules, one module per area.

A use case called for a caller takes the caller's `Principal` and a `UnitOfWork`, validates its
input completely before writing anything, raises `controller.errors` on a "no", and commits at
most once. The group commits (`submits.SubmitBatcher`, `deletes.DeleteBatcher`) take the
`Database` and run one unit of work for many callers, each caller's rules unchanged. Values
going in and out are the plain dataclasses of `controller.domain.values`; servicers convert
them from and to protobuf, so the rules here know neither gRPC nor protobuf.
"""
