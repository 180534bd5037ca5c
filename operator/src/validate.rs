//! The one validation path: the same checks for every source (folder, Kubernetes, REST API).
