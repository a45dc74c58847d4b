{
  "targets": [
    {
      "target_name": "socket_ops",
      "sources": ["native/socket_ops.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "conditions": [["OS!='linux'", { "type": "none" }]]
    }
  ]
}
