// etcd for netaudit's local control plane (`cargo xtask cluster up`, the agent tests): the
// published etcd server, built from its Go module at the version go.mod pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
