// A vSphere API simulator for vmrepo's tests: govmomi's simulator library (Debian's
// golang-github-vmware-govmomi-dev) serving HTTPS on loopback with a given certificate, user
// and password. Built and started by scripts/vsphere-sim.sh.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	certFile := flag.String("cert", "", "TLS certificate (PEM)")
	keyFile := flag.String("key", "", "TLS key (PEM)")
	user := flag.String("user", "root", "login user")
	pass := flag.String("pass", "", "login password")
	mode := flag.String("mode", "esx", "esx (a standalone host) or vpx (vCenter)")
	vms := flag.Int("vms", 2, "VMs per resource pool")
	datastores := flag.Int("ds", 2, "datastores (LocalDS_0, LocalDS_1, ...; the VMs are on the first)")
	flag.Parse()

	var m *simulator.Model
	switch *mode {
	case "esx":
		m = simulator.ESX()
	case "vpx":
		m = simulator.VPX()
		m.Cluster = 0
		m.Host = 1
	default:
		log.Fatalf("unknown -mode %q", *mode)
	}
	m.Machine = *vms
	m.Datastore = *datastores
	if err := m.Create(); err != nil {
		log.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	m.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	m.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	s := m.Service.NewServer()
	fmt.Printf("VSIM_ADDR=%s\n", s.URL.Host)
	os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	s.Close()
	m.Remove()
}
