//! Shared scaffolding for the end-to-end tests.
