# Sourced by /init and /etc/qlink/hotplug: a NIC's port number from where it sits.
#
# pci_position SYSFS_PCI_DEVICE_PATH: prints "mgmt" or the port number N.
#   root bus 0000:00, slot 0x01, function 0       -> mgmt
#   slot j=1..31, function 0, behind the PCI-PCI bridge at root slot 0x03+k
#   (bridge k = 0..27)                             -> N = 31*k + (j-1)
pci_position() {
	_dev=$1
	_addr=${_dev##*/}
	_parent=${_dev%/*}
	_pname=${_parent##*/}
	case "$_addr" in
	????:??:??.0) ;;
	*) return 1 ;;
	esac
	_slot=${_addr%.*}
	_slot=$((0x${_slot##*:}))
	case "$_pname" in
	pci0000:00)
		[ "$_slot" -eq 1 ] || return 1
		echo mgmt
		;;
	0000:00:??.0)
		_gp=${_parent%/*}
		[ "${_gp##*/}" = pci0000:00 ] || return 1
		_bslot=${_pname#0000:00:}
		_k=$((0x${_bslot%.0} - 0x03))
		[ "$_k" -ge 0 ] && [ "$_k" -le 27 ] || return 1
		[ "$_slot" -ge 1 ] && [ "$_slot" -le 31 ] || return 1
		echo $((31 * _k + _slot - 1))
		;;
	*) return 1 ;;
	esac
}

# nic_pci_device IFNAME: the sysfs path of the PCI device behind a NIC
# (for virtio the NIC's device is virtioN, whose parent is the PCI device).
nic_pci_device() {
	_dev=$(readlink -f "/sys/class/net/$1/device")
	case "${_dev##*/}" in
	????:??:??.?) ;;
	*) _dev=${_dev%/*} ;;
	esac
	echo "$_dev"
}
