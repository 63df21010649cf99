// SPDX-License-Identifier: GPL-2.0
/* kmt_pkgb: imports kmt_pkga_hello (from kmt_pkga) and _printk. */
#include <linux/init.h>
#include <linux/module.h>
#include <linux/printk.h>
#include "kmt_pkga.h"

static int __init kmt_pkgb_init(void)
{
	int ret = kmt_pkga_hello();

	pr_info("kmt_pkgb: loaded\n");
	return ret;
}

static void __exit kmt_pkgb_exit(void)
{
	pr_info("kmt_pkgb: unloaded\n");
}

module_init(kmt_pkgb_init);
module_exit(kmt_pkgb_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmodd test module: consumer of kmt_pkga");
