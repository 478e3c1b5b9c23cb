"""Throwaway third-party servers (Dovecot) started on 127.0.0.1 for the demo and the
integration tests: one implementation shared by both, never used by the product's
services themselves."""
