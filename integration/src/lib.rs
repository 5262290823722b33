//! Helpers for tests against the real stack (placeholder until the harness lands).
