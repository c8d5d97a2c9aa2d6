//! The egress proxy (issue 3).
