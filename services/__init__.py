"""webshard's gRPC services. Each service is its own subpackage; they share only services.common."""
