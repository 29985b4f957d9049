"""Small shared pieces with no recursify imports: device and dtype resolution, memory estimates."""
