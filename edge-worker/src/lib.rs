//! Placeholder until the edge issue lands.
